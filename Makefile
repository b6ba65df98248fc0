# Two entry points for a fresh machine:  `make run` (the default training run)  and  `make test`.
# `make test` runs offline (scripts/test.sh); `make run` may fetch the LPIPS VGG16 file once when online.

.PHONY: setup run test check-wheels
setup:
	./scripts/setup-env.sh

run: setup
	.venv/bin/xqgan-run registry.toml

test: setup
	./scripts/test.sh

# the wheels of every distribution, installed (not editable) into a clean venv, then 3 steps of the default run
check-wheels:
	./scripts/check-wheels.sh
