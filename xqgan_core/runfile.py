"""The schema of a run file (``registry.toml``): which tables exist and what their plain options mean.

Component tables (``[encoder]``, ``[quantizer]``, ``[[discriminators]]``, ...) are validated against the selected
component's own Config; the engine-level tables (``[run]``, ``[train]``, ``[loss]``, ``[eval]``) are defined here.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import attrs

from .config import ComponentSpec, at_least, between, component, config, non_empty, option, positive, section


#: the two kinds of run a run file describes (``RunConfig.kind``)
RunKind = Literal["tokenizer", "generator"]

_RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _run_name(_inst: Any, _attr: Any, value: str) -> None:
    # run.name becomes a folder name inside run.out_dir: it must not climb out of it ("../x", "/abs", "a/b")
    if not _RUN_NAME.fullmatch(value) or ".." in value:
        raise ValueError(
            f"must be a simple name (letters, digits, '.', '_', '-'; not starting with '.', no '/' or '..'), got "
            f"{value!r}: it becomes a folder name in run.out_dir. To write elsewhere, set run.out_dir instead"
        )


def _diffaug_policy(_inst: Any, _attr: Any, value: str) -> None:
    if value.strip():  # torch is imported only when the option is used
        from .diffaug import parse_policy

        parse_policy(value)


@config
class RunSection:
    name: str = option(
        "xqgan", help="Run name (letters, digits, '.', '_', '-'); used in the output folder and reports.",
        validator=_run_name,
    )
    out_dir: str = option(
        "runs/{name}",
        help="Folder for checkpoints, metrics, TensorBoard logs and image grids; '{name}' is replaced by run.name. "
        "Rerunning with the same folder resumes from its last checkpoint.",
        validator=non_empty(),
    )
    seed: int = option(0, help="Seed for Python, NumPy and torch RNGs (recorded in every checkpoint).")
    resume: bool = option(True, help="Resume from the last checkpoint in out_dir if there is one.")


@config
class TrainSection:
    steps: int = option(1000, help="Total optimizer steps.", validator=positive())
    batch_size: int = option(8, help="Images per micro-batch (per process).", validator=positive())
    grad_accum: int = option(1, help="Micro-batches accumulated per optimizer step.", validator=positive())
    lr: float = option(1e-4, help="Peak learning rate of what the run trains: the tokenizer (encoder, quantizer, "
                                  "decoder) or the generator.", validator=positive())
    disc_lr: float = option(1e-4, help="Peak learning rate of the discriminator(s).", validator=positive())
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas for both optimizers.")
    weight_decay: float = option(0.0, help="AdamW weight decay of the tokenizer (or the generator; VAR used 0.05).",
                                 validator=at_least(0))
    disc_weight_decay: float = option(5e-4, help="AdamW weight decay of the discriminator.", validator=at_least(0))
    warmup_steps: int = option(100, help="Linear warm-up steps before the decay.", validator=at_least(0))
    min_lr_ratio: float = option(0.1, help="Final learning rate as a fraction of the peak.", validator=between(0, 1))
    lr_schedule: Literal["cosine", "linear"] = option(
        "cosine", help="Decay after the warm-up, from the peak to min_lr_ratio at the last step: cosine or linear."
    )
    lr_hold: float = option(0.0, help="Fraction of the steps after the warm-up that keep the peak learning rate "
                                      "before the decay starts (VAR's lin0 schedule: 0.05 with linear).",
                            validator=between(0, 0.99))
    grad_clip: float = option(1.0, help="Max global gradient norm; 0 switches clipping off.", validator=at_least(0))
    ema_decay: float = option(0.999, help="EMA decay of the trained weights (tokenizer or generator); 0 switches EMA off.",
                              validator=between(0, 1))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", help="Autocast dtype: auto = bf16 on CUDA/HPU, fp32 on CPU."
    )
    channels_last: bool = option(
        False,
        help="channels-last memory format for conv backbones (measure first: slower for the GroupNorm CNN on an H200 "
        "and on our CPU; see benchmarks/README.md)",
    )
    checkpoint_every: int = option(200, help="Write a checkpoint every N optimizer steps (and at the end).", validator=positive())
    keep_checkpoints: int = option(2, help="How many step checkpoints to keep (the newest ones).", validator=positive())
    eval_every: int = option(500, help="Evaluate on the held-out split every N steps (and at the end).", validator=positive())
    log_every: int = option(10, help="Write training scalars every N steps.", validator=positive())
    num_workers: int = option(0, help="DataLoader worker processes.", validator=at_least(0))
    max_bad_steps: int = option(
        20, help="Stop the run after this many consecutive steps with a NaN/inf loss.", validator=positive()
    )
    dist_timeout_s: float = option(
        1800.0,
        help="torchrun runs: a rank waiting longer than this (seconds) for the others in a collective fails with an "
        "error instead of hanging (a peer died or is stuck); raise it if evaluation on rank 0 takes longer",
        validator=positive(),
    )
    init_from: str = option(
        "",
        help="fine-tuning: start from this checkpoint's tokenizer weights (a checkpoint folder or a run's out_dir, "
        "whose encoder/quantizer/decoder must match this run file's). Ignored when out_dir already holds a "
        "checkpoint: the run then resumes. Empty = random initialisation.",
    )
    init_use_ema: bool = option(True, help="with init_from: take the EMA weights when that checkpoint has them")
    init_discriminators: bool = option(
        True, help="with init_from: also start the discriminators from that checkpoint's (if it has them)"
    )


@config
class LossSection:
    l2: float = option(1.0, help="Weight of the mean squared reconstruction error.", validator=at_least(0))
    l1: float = option(0.0, help="Weight of the mean absolute reconstruction error.", validator=at_least(0))
    quantizer: float = option(1.0, help="Weight of the quantizer's own losses (codebook, commitment, entropy).", validator=at_least(0))
    perceptual: float = option(1.0, help="Weight of the LPIPS perceptual loss (off with a warning if weights are missing).", validator=at_least(0))
    lpips_weights: str = option(
        "",
        help="Local file with the LPIPS VGG16 backbone state dict (torchvision layout); empty = the torch hub cache.",
    )
    require_perceptual: bool = option(
        False,
        help="Stop before training when the LPIPS VGG16 file is missing (and cannot be downloaded) instead of "
        "training without the perceptual loss (the GPU presets set it).",
    )
    adversarial: float = option(0.5, help="Weight of the generator's adversarial loss.", validator=at_least(0))
    disc_start: int = option(2000, help="Step at which the discriminator and adversarial loss switch on.", validator=at_least(0))
    disc_loss: Literal["hinge", "vanilla", "non_saturating"] = option("hinge", help="Discriminator/generator GAN loss family.")
    adaptive_weight: bool = option(True, help="Scale the adversarial loss by ||grad rec|| / ||grad adv|| at the decoder's last layer.")
    adaptive_max: float = option(1e4, help="Upper clamp of the adaptive weight.", validator=positive())
    lecam: float = option(0.0, help="Weight of LeCam regularisation on the discriminator (paper: 0.001).", validator=at_least(0))
    lecam_decay: float = option(0.999, help="EMA decay of the LeCam anchors.", validator=between(0, 1))
    r1: float = option(
        0.0,
        help="weight gamma of the R1 gradient penalty gamma/2 * E||grad_x D(x)||^2 on real images (StyleGAN2 used "
        "10 at 1024 px; 0 = off)",
        validator=at_least(0),
    )
    r1_every: int = option(
        16, help="lazy R1: apply it every N discriminator steps, scaled by N (StyleGAN2's choice)", validator=positive()
    )
    diffaug: str = option(
        "",
        help="DiffAugment of what the discriminators see (real and reconstructed images in their step, "
        "reconstructions in the adversarial term): comma-separated operations out of translation, color, cutout, "
        "applied in the order written (the reference's DINO discriminator: \"translation,color,cutout\"); \"\" = off",
        validator=_diffaug_policy,
    )
    diffaug_prob: float = option(
        1.0, help="Probability that each DiffAug operation changes a sample (drawn per sample).", validator=between(0, 1)
    )
    diffaug_translation: float = option(
        0.125, help="DiffAug translation: largest shift as a fraction of the image side.", validator=between(0, 1)
    )
    diffaug_cutout: float = option(
        0.2, help="DiffAug cutout: side of the zeroed square as a fraction of the image side.", validator=between(0, 1)
    )
    alignment: float = option(1.0, help="Global multiplier of the aligners' losses (each [[aligners]] table has its "
                                        "own weight, paper: 0.1); 0 switches alignment off.", validator=at_least(0))


@config
class EvalSection:
    max_images: int = option(64, help="Held-out images used per evaluation (0 = all).", validator=at_least(0))
    batch_size: int = option(8, help="Batch size of evaluation.", validator=positive())
    grid_images: int = option(8, help="Images in the saved reconstruction grid.", validator=at_least(0))
    lpips: bool = option(True, help="Compute the LPIPS metric (needs the LPIPS backbone weights).")


@config
class TokenizerRef:
    """The frozen tokenizer of a generator run ([tokenizer]); never trained, never saved with the generator."""

    run: str = option(
        help="The tokenizer: a tokenizer run's out_dir or checkpoint folder, a file inside it, or a Hugging Face repo "
        "id holding a run folder (Tokenizer.from_pretrained).",
        validator=non_empty(),
    )
    use_ema: bool = option(True, help="Load the tokenizer run's EMA weights when it has them.")
    filename: str = option("", help="With a Hugging Face repo id in `run`: the checkpoint file inside it.")
    sha256: str = option(
        "",
        help="sha256 of the tokenizer's weight file. Filled in by the run (the run.toml of a generator run records "
        "it); when given, loading other weights is refused.",
    )


@config
class SampleSection:
    """How a generator run samples: its evaluation grid, and the defaults of ``xqgan-run sample`` for the run."""

    cfg_scale: float = option(1.0, help="Classifier-free guidance scale (1 = the conditional model alone).",
                              validator=at_least(0))
    temperature: float = option(1.0, help="Softmax temperature of sampling.", validator=positive())
    top_k: int = option(0, help="Sample among the k most likely tokens (0 = all; 1 = greedy).", validator=at_least(0))
    top_p: float = option(1.0, help="Nucleus sampling: the smallest set of tokens with this mass (1 = all).",
                          validator=between(0, 1))
    seed: int = option(0, help="Seed of the sampling generator (the evaluation grid draws the same samples each time).")


@config
class RunConfig:
    run: RunSection = section(RunSection, help="Run name, output folder, seed.")
    device: ComponentSpec | None = component("device", default=None, help="cpu / cuda / hpu; default: the best available.")
    data: ComponentSpec | None = component("data", default=None, help="The image source and its held-out split.")
    encoder: ComponentSpec | None = component("encoder", default=None, help="Images -> latents.")
    quantizer: ComponentSpec | None = component("quantizer", default=None, help="Latents -> codes and indices.")
    decoder: ComponentSpec | None = component("decoder", default=None, help="Codes -> images.")
    discriminators: tuple[ComponentSpec, ...] = component("discriminator", many=True, help="Adversarial critics ([[discriminators]]).")
    aligners: tuple[ComponentSpec, ...] = component("aligner", many=True, help="Semantic alignment teachers ([[aligners]]).")
    adapters: tuple[ComponentSpec, ...] = component("adapter", many=True, help="Fine-tuning adapters: frozen / LoRA ([[adapters]]).")
    generator: ComponentSpec | None = component(
        "generator", default=None, help="An AR generator trained on a frozen tokenizer's tokens (a generator run)."
    )
    tokenizer: TokenizerRef | None = option(
        None, help="A generator run's frozen tokenizer ([tokenizer] run = PATH); only with [generator]."
    )
    sample: SampleSection | None = option(
        None, help="A generator run's sampling settings (evaluation grid, `xqgan-run sample` defaults); only with [generator]."
    )
    hooks: tuple[ComponentSpec, ...] = component("hooks", many=True, help="Lifecycle hook plugins switched on for this run ([[hooks]]).")
    train: TrainSection = section(TrainSection, help="Optimisation settings.")
    loss: LossSection = section(LossSection, help="Loss weights and GAN settings.")
    eval: EvalSection = section(EvalSection, help="Held-out evaluation settings.")

    @property
    def kind(self) -> RunKind:
        """What the run trains: "generator" when the run file has a [generator] table, else "tokenizer"."""
        return "generator" if self.generator is not None else "tokenizer"

    def check(self) -> list[str]:
        if self.kind == "generator":
            return self._generator_run_problems()
        problems = [f"{key}: only a generator run (one with a [generator] table) has a [{key}] table"
                    for key in ("tokenizer", "sample") if getattr(self, key) is not None]
        tokenizer_parts = {"encoder": self.encoder, "quantizer": self.quantizer, "decoder": self.decoder}
        given = [k for k, v in tokenizer_parts.items() if v is not None]
        if given and len(given) < 3:
            missing = ", ".join(f"[{k}]" for k, v in tokenizer_parts.items() if v is None)
            problems.append(f"a tokenizer needs [encoder], [quantizer] and [decoder]; missing {missing}")
        return problems

    def _generator_run_problems(self) -> list[str]:
        problems = []
        if self.tokenizer is None:
            problems.append('tokenizer: a generator run needs its frozen tokenizer: add [tokenizer] run = "PATH" (a '
                            "tokenizer run's out_dir or checkpoint, or a Hugging Face repo id)")
        tokenizer_tables = ("encoder", "quantizer", "decoder", "discriminators", "aligners", "adapters")
        for key in tokenizer_tables:
            if getattr(self, key):
                problems.append(f"{key}: a generator run (it has a [generator] table) trains no tokenizer: remove "
                                f"[{key}]; the frozen tokenizer comes from [tokenizer] run = PATH")
        if self.train.init_from:
            problems.append("train.init_from: not supported in a generator run (it loads tokenizer weights); "
                            "the tokenizer comes from [tokenizer] run")
        if self.loss != LossSection():  # its options weigh tokenizer losses: they would be silently ignored
            problems.append("loss: a generator run trains with the token cross entropy only: remove [loss] (its "
                            "options weigh the tokenizer's losses)")
        return problems


def complete(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the tables its kind of run uses filled with their defaults (a generator run's [sample]), so the
    resolved run file shows every effective value."""
    if cfg.kind == "generator" and cfg.sample is None:
        return attrs.evolve(cfg, sample=SampleSection())
    return cfg
