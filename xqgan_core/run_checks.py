"""Checks of a run file that span several tables, made when it is validated (``xqgan-run validate`` and before
training), so a mismatch is reported with its key paths before anything is built or written.

Each function returns a list of problems ("key.path: what is wrong"), empty when all is well.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ComponentSpec

#: Deeper tables / arrays are refused: no run file needs them, and the recursive parts of parsing, copying and
#: validating would otherwise die with a RecursionError.
MAX_NESTING = 64

#: Tables accepted by the schema whose feature is not implemented yet: using one is an error, never ignored.
NOT_IMPLEMENTED: dict[str, str] = {}


def nesting_problems(data: Any, limit: int = MAX_NESTING) -> list[str]:
    """A problem for each top-level key whose value nests tables / arrays more than ``limit`` levels deep."""
    problems = []
    items = data.items() if isinstance(data, Mapping) else [("(top level)", data)]
    for key, value in items:
        stack = [(value, 1)]
        while stack:  # iterative: the point is to survive nesting a recursive walk would not
            node, depth = stack.pop()
            if depth > limit:
                problems.append(f"{key}: tables / arrays nested more than {limit} levels deep")
                break
            children = node.values() if isinstance(node, Mapping) else node if isinstance(node, (list, tuple)) else ()
            stack.extend((child, depth + 1) for child in children)
    return problems


def not_implemented_tables(data: Mapping[str, Any]) -> list[str]:
    return [f"{key}: {why}" for key, why in NOT_IMPLEMENTED.items() if key in data]


def cross_table_problems(cfg: Any) -> list[str]:
    """Latent dimensions of encoder / quantizer / decoder, and data.resolution against the encoder and metrics.

    ``cfg`` is a validated ``RunConfig``; components that do not declare a value are not checked. A generator run
    (``cfg.kind == "generator"``) has no tokenizer tables: its [tokenizer] run must exist.
    """
    if cfg.kind == "generator":
        return _tokenizer_run(cfg.tokenizer.run if cfg.tokenizer is not None else "")
    return (_latent_dims(cfg.encoder, cfg.quantizer, cfg.decoder) + _branches(cfg.encoder, cfg.quantizer)
            + _resolution(cfg.data, cfg.encoder) + _aligner_views(cfg.aligners, cfg.quantizer))


def _tokenizer_run(run: str) -> list[str]:
    """[tokenizer] run must name a tokenizer run (out_dir or checkpoint folder, or a file inside one), a foreign
    checkpoint file ``Tokenizer.from_pretrained`` converts, or a Hugging Face repo id (resolved when loading)."""
    from . import checkpoint as ckpt
    from .pretrained import _REPO_ID, _is_foreign_file

    if not run:
        return []  # RunConfig.check already reported the missing table / option
    path = Path(run).expanduser()
    if not path.exists():
        if _REPO_ID.fullmatch(run):
            return []
        return [f"tokenizer.run: no tokenizer run at {str(path.resolve())!r} (no such file or folder, and not a "
                "Hugging Face repo id 'owner/name'); train the tokenizer first (xqgan-run TOKENIZER.toml) and give "
                "its out_dir"]
    if path.is_file() and _is_foreign_file(path):
        return []
    folder = path.parent if path.is_file() else path
    is_checkpoint = all((folder / f).is_file() for f in (ckpt.STATE, ckpt.RUN, ckpt.META))
    if not is_checkpoint and not ckpt.complete_checkpoints(folder):
        return [f"tokenizer.run: {str(path)!r} holds no tokenizer checkpoint (expected a tokenizer run's out_dir, one "
                f"of its checkpoint folders, or a file inside one)"]
    return []


def _aligner_views(aligners: Any, quantizer: ComponentSpec | None) -> list[str]:
    """Each aligner's branch (and scale) must exist in the quantizer (``Quantizer.config_code_views``)."""
    views = None
    if quantizer is not None and callable(getattr(quantizer.cls, "config_code_views", None)):
        views = quantizer.cls.config_code_views(quantizer.config)
    problems = []
    for i, spec in enumerate(aligners or ()):
        config_view = getattr(spec.cls, "config_view", None)
        wanted = config_view(spec.config) if callable(config_view) and views is not None else None
        if wanted is None:
            continue
        branch, scale = wanted
        for key, value, check in (("branch", branch, views.branch_index), ("scale", scale, views.scale_index)):
            if value is None:
                continue
            try:
                check(value)
            except ValueError as exc:
                problems.append(f"aligners[{i}].{key}: {exc} (quantizer '{quantizer.use}')")
    return problems


def _branches(encoder: ComponentSpec | None, quantizer: ComponentSpec | None) -> list[str]:
    """An encoder with branches (vit's latent-query branches, one channel group each) and a product quantizer must
    agree on their count: pq splits channels into its own groups, so with another count a pq branch would quantize
    parts of several encoder branches together."""
    enc_branches = _int_option(encoder, "branches")
    q_branches = _int_option(quantizer, "branches")
    if enc_branches is None or q_branches is None or enc_branches == q_branches:
        return []
    assert encoder is not None and quantizer is not None
    return [f"quantizer.branches: {q_branches} does not match encoder.branches = {enc_branches} (encoder "
            f"'{encoder.use}' writes branch i's tokens to channel group i, quantizer '{quantizer.use}' quantizes "
            f"channel group i with its branch i); set both to the same number"]


def _latent_dims(encoder: ComponentSpec | None, quantizer: ComponentSpec | None, decoder: ComponentSpec | None) -> list[str]:
    enc_dim = _int_option(encoder, "out_dim")
    dec_dim = _int_option(decoder, "in_dim")
    q_dim = _quantizer_dim(quantizer) if quantizer is not None else None
    if q_dim is None:
        # a quantizer returns latents of its input's shape, so the decoder reads what the encoder writes
        if enc_dim is not None and dec_dim is not None and enc_dim != dec_dim:
            return [f"decoder.in_dim: {dec_dim} does not match encoder.out_dim = {enc_dim} (the quantizer keeps the "
                    "latents' shape); set both to the quantizer's code dimension"]
        return []
    assert quantizer is not None
    problems = []
    for key, value, role in (("encoder.out_dim", enc_dim, "produces"), ("decoder.in_dim", dec_dim, "reads")):
        if value is not None and value != q_dim:
            problems.append(
                f"{key}: the {key.split('.')[0]} {role} {value}-channel latents but quantizer '{quantizer.use}' works "
                f"on {q_dim}-dimensional codes; set {key} = {q_dim}"
            )
    return problems


def _resolution(data: ComponentSpec | None, encoder: ComponentSpec | None) -> list[str]:
    from .metrics import SSIM_MIN_SIZE  # imports torch: only needed once a run file has a data source

    res = _int_option(data, "resolution")
    if res is None:
        return []
    problems = []
    if res < SSIM_MIN_SIZE:
        problems.append(
            f"data.resolution: {res} px is smaller than {SSIM_MIN_SIZE} px, the smallest image evaluation's SSIM "
            f"accepts (its window is {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE})"
        )
    factor = _encoder_downsample(encoder)
    if encoder is not None and factor and res % factor:
        below, above = res // factor * factor, (res // factor + 1) * factor
        choices = f"{below} or {above}" if below else str(above)
        problems.append(
            f"data.resolution: {res} is not divisible by {factor}, the downsampling factor of encoder "
            f"'{encoder.use}' (the token grid would not be whole); use a multiple of {factor}, e.g. {choices}"
        )
    return problems


def _quantizer_dim(spec: ComponentSpec) -> int | None:
    config_dim = getattr(spec.cls, "config_dim", None)
    dim = config_dim(spec.config) if callable(config_dim) else getattr(spec.config, "dim", None)
    return dim if _is_int(dim) else None


def _encoder_downsample(spec: ComponentSpec | None) -> int | None:
    if spec is None:
        return None
    config_downsample = getattr(spec.cls, "config_downsample", None)
    factor = config_downsample(spec.config) if callable(config_downsample) else None
    return factor if _is_int(factor) and factor > 0 else None


def _int_option(spec: ComponentSpec | None, name: str) -> int | None:
    value = getattr(spec.config, name, None) if spec is not None else None
    return value if _is_int(value) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
