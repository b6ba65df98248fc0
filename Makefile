# Two entry points for a fresh machine:  `make run` (the default training run)  and  `make test`.
export HF_HUB_OFFLINE := 1

.PHONY: setup run test
setup:
	./scripts/setup-env.sh

run: setup
	.venv/bin/xqgan-run registry.toml

test: setup
	./scripts/test.sh
