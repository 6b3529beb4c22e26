"""What inference will cost on a Kaggle kernel: measured throughput of the real inference path,
and a FLOP estimate of a blend at assumed T4 speeds, both against the 9-hour limit."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from gitract.config import load_config
from gitract.errors import GitractError

# torch and the model stack are imported inside the functions that use them: the Kaggle
# kernel script imports this module before its wheels are installed.

__all__ = [
    "ASSUMED_T4_TFLOPS",
    "MemberEstimate",
    "RuntimeEstimate",
    "count_flops",
    "estimate_blend",
    "estimate_runtime",
    "format_blend_estimate",
    "format_estimate",
    "measure_throughput",
]


# --------------------------------------------------------------------------- runtime estimate


@dataclass(frozen=True)
class RuntimeEstimate:
    """Forward passes of the hidden test and the wall time they take at the measured speed."""

    slices: int
    folds: int
    views: int
    images_per_second: float
    device: str
    batch_size: int
    img_size: tuple[int, int]
    model: str

    @property
    def forward_passes(self) -> int:
        return self.slices * self.folds * self.views

    @property
    def seconds(self) -> float:
        return self.forward_passes / self.images_per_second


def measure_throughput(ensemble, batch_size: int, batches: int = 3) -> float:
    """Images per second of ``ensemble.predict`` (one model, no TTA: one forward pass per
    image) on random inputs of the configured size, after one warm-up batch."""
    import torch

    data = ensemble.data_config
    height, width = data.img_size
    images = torch.rand(batch_size, data.in_channels, height, width)
    ensemble.predict(images)  # warm-up: cuDNN autotuning, lazy allocations
    if ensemble.device.type == "cuda":
        torch.cuda.synchronize(ensemble.device)
    start = time.perf_counter()
    for _ in range(batches):
        ensemble.predict(images)
    if ensemble.device.type == "cuda":
        torch.cuda.synchronize(ensemble.device)
    return batch_size * batches / (time.perf_counter() - start)


def estimate_runtime(
    slices: int,
    runs: Path | None = None,
    config: Path | None = None,
    *,
    folds: int | None = None,
    batch_size: int | None = None,
    batches: int = 3,
    device=None,
) -> RuntimeEstimate:
    """Time one model of ``runs`` (or, random-init, of ``config``) of a slice-wise kind, in
    the run's precision, and scale to ``slices`` x folds x TTA views. Folds: ``folds``, else
    the runs' count, else 5 for a config. The batch is the config's ``infer.batch_size`` on a
    GPU, 2 on a CPU (a B7 batch of 32 takes minutes)."""
    import torch

    from gitract.models.checkpoint import find_checkpoints, run_config_of
    from gitract.models.kind2d import Ensemble
    from gitract.models.kinds import kind_of

    if slices < 1 or batches < 1:
        raise GitractError(f"--slices and --batches must be >= 1, got {slices}, {batches}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if runs is not None:
        paths = find_checkpoints(runs)
        models, cfg, precision = kind_of(run_config_of(paths[0])).load_folds(paths[:1], device)
        n_folds = folds or len(paths)
    elif config is not None:
        cfg = load_config(config)
        kind = kind_of(cfg)
        precision = kind.precision(cfg, device, training=False)
        models = [precision.to_model(kind.build(cfg, pretrained=False)).eval()]
        n_folds = folds or 5
    else:
        raise GitractError("estimate: give --runs (trained folds) or --config")
    on_cuda = device.type == "cuda"
    ensemble = Ensemble(models, [cfg], device, (), precision)
    batch = batch_size or (cfg.infer.batch_size if on_cuda else 2)
    speed = measure_throughput(ensemble, batch, batches)
    name = f"{cfg.model.arch}/{cfg.model.encoder_name}"
    if on_cuda:
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    return RuntimeEstimate(
        slices,
        n_folds,
        1 + len(cfg.infer.tta_flips),
        speed,
        device_name,
        batch,
        (cfg.data.img_size[0], cfg.data.img_size[1]),
        name,
    )


def format_estimate(est: RuntimeEstimate, limit_hours: float = 9.0) -> str:
    """Human-readable estimate, with the arithmetic spelled out and the 9-hour limit checked."""
    hours = est.seconds / 3600
    verdict = "fits" if hours <= limit_hours else "does NOT fit"
    h, w = est.img_size
    return "\n".join(
        [
            f"model            {est.model} at {h}x{w}, batch {est.batch_size}, on {est.device}",
            f"measured         {est.images_per_second:.2f} images/s (one forward pass each)",
            f"forward passes   {est.slices} slices x {est.folds} folds x {est.views} views "
            f"= {est.forward_passes}",
            f"expected time    {est.forward_passes} / {est.images_per_second:.2f} = "
            f"{est.seconds:.0f} s = {hours:.2f} h (model only; PNG decoding and RLE overlap "
            "with it in DataLoader workers)",
            f"kaggle limit     {limit_hours:g} h: {verdict}",
        ]
    )


# ------------------------------------------------------------------- FLOP estimate of a blend

#: Assumed effective T4 throughput (fp16 autocast), TFLOP/s, per kind of member: an assumption,
#: not a measurement (no T4 here). 2.5D: EfficientNet's depthwise convolutions are memory-bound
#: (~1.4 TFLOP/s, the README's figure for a B7 U-Net at batch 32). 3D: dense 3x3x3 convolutions
#: run on the tensor cores (T4 peak 65 TFLOP/s fp16); ~8 TFLOP/s, about an eighth of the peak.
ASSUMED_T4_TFLOPS: dict[str, float] = {"2.5d": 1.4, "3d": 8.0}


@dataclass(frozen=True)
class MemberEstimate:
    """Forward passes and FLOPs of one member of a blend on the hidden test."""

    name: str
    kind: str
    model: str
    input_shape: tuple[int, ...]  # of one forward pass (batch 1)
    passes_per_view: int  # 2.5D: slices; 3D: sliding-window tiles over all case-days
    folds: int
    views: int
    gflops_per_pass: float
    weight: float = 1.0
    unit: str = "slices"  # what one pass covers: slices, or (3D) sliding-window tiles

    @property
    def forward_passes(self) -> int:
        return self.passes_per_view * self.folds * self.views

    @property
    def flops(self) -> float:
        return self.forward_passes * self.gflops_per_pass * 1e9


def count_flops(model, input_shape: tuple[int, ...]) -> float:
    """FLOPs of one forward pass at ``input_shape`` (``torch.utils.flop_counter``), counted on
    the meta device: shapes only, no arithmetic, so a B7 or a 3D SegResNet takes seconds."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(*input_shape, device="meta"))
    return float(counter.get_total_flops())


def estimate_blend(
    members,  # Sequence[gitract.inference.blend.MemberSpec]
    slices: int,
    case_days: int,
    folds: int | None = None,
) -> list[MemberEstimate]:
    """Per member: forward passes on a hidden test of ``slices`` slices in ``case_days``
    case-days (3D: each case-day ``slices / case_days`` deep, rounded up) and FLOPs per pass,
    from the config of its first checkpoint (random-init network of that config: no weights
    loaded). Folds: ``folds``, else the run's count. TTA views: the run's ``infer.tta_flips``."""
    from gitract.models.checkpoint import find_checkpoints, run_config_of
    from gitract.models.kinds import kind_of

    if slices < 1 or case_days < 1:
        raise GitractError(f"--slices and --case-days must be >= 1, got {slices}, {case_days}")
    out = []
    for member in members:
        paths = find_checkpoints(member.run)
        cfg = run_config_of(paths[0])
        views = 1 + len(cfg.infer.tta_flips)
        kind = kind_of(cfg)
        plan = kind.forward_plan(cfg, slices, case_days)
        gflops = count_flops(kind.build(cfg, pretrained=False).eval(), plan.input_shape) / 1e9
        out.append(
            MemberEstimate(
                member.run.name, kind.name, plan.label, plan.input_shape, plan.passes,
                folds or len(paths), views, gflops, member.weight, plan.unit,
            )
        )  # fmt: skip
    return out


def format_blend_estimate(
    estimates: list[MemberEstimate],
    slices: int,
    case_days: int,
    tflops: dict[str, float] | None = None,
    limit_hours: float = 9.0,
) -> str:
    """The FLOP arithmetic per member and in all, against the 9-hour limit, at the assumed T4
    throughputs (labelled as an estimate)."""
    tflops = {**ASSUMED_T4_TFLOPS, **(tflops or {})}
    lines = [
        f"FLOP estimate (an estimate, not a measurement): {slices} slices in {case_days} "
        f"case-days, assumed T4 effective throughput "
        + ", ".join(f"{k} {v:g} TFLOP/s" for k, v in tflops.items())
    ]
    total = 0.0
    for est in estimates:
        seconds = est.flops / (tflops[est.kind] * 1e12)
        total += seconds
        lines.append(
            f"  {est.name} ({est.kind}, {est.model}, input {'x'.join(map(str, est.input_shape))}"
            f", weight {est.weight:g}): {est.passes_per_view} {est.unit} x {est.folds} folds x "
            f"{est.views} views = {est.forward_passes} passes x {est.gflops_per_pass:.1f} GFLOPs"
            f" = {est.flops / 1e15:.2f} PFLOPs -> {seconds:.0f} s = {seconds / 3600:.2f} h"
        )
    hours = total / 3600
    verdict = "fits" if hours <= limit_hours else "does NOT fit"
    lines.append(
        f"  blend total: {total:.0f} s = {hours:.2f} h of model time; "
        f"kaggle limit {limit_hours:g} h: {verdict}"
    )
    return "\n".join(lines)
