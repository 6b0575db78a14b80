"""A run's headline numbers, each beside its baseline, and where the time went: the last screen of
``patchflow run`` and the table in the flow run's Prefect artifact.

Every value comes from the metrics a stage logged (its manifest's); a stage that did not run, or a
metric it did not log, leaves its row out rather than showing a blank or a made-up number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from tasks.stage import StageResult


@dataclass(frozen=True)
class Headline:
    stage: str
    measure: str
    value: str
    baseline: str


Metrics = Mapping[str, float]


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


@dataclass(frozen=True)
class _Spec:
    """One headline: ``key`` in ``stage``'s metrics, shown with ``show``, beside each baseline present."""

    stage: str
    measure: str
    key: str
    baselines: tuple[tuple[str, str], ...] = ()
    show: Callable[[float], str] = _percent
    note: Callable[[Metrics], str] | None = None  # said after the baselines, from the same metrics


def _vae_note(metrics: Metrics) -> str:
    if "pretrained_val_psnr" in metrics:
        return ""  # the baseline already says what ran
    return {1.0: "pretrained TAEF2", 0.0: "a small VAE trained here"}.get(metrics.get("pretrained", -1.0), "")


SPECS = (
    _Spec("evaluate", "MAE linear probe top-1", "mae_linear_top1",
          (("raw pixels", "pixels_linear_top1"), ("random-init encoder", "random_init_linear_top1"))),
    _Spec("evaluate", "MAE kNN top-1", "mae_knn_top1", (("random-init encoder", "random_init_knn_top1"),)),
    _Spec("evaluate", "fine-tune top-1", "finetune_top1", (("same ViT from scratch", "scratch_top1"),)),
    _Spec("clip_train", "CLIP text→image recall@10", "trained_t2i_recall_at_10",
          (("random-init tower", "random_init_t2i_recall_at_10"), ("untrained", "untrained_t2i_recall_at_10"),
           ("chance", "chance_recall_at_10"))),
    _Spec("clip_train", "CLIP zero-shot top-1", "trained_zero_shot_top1",
          (("chance", "chance_zero_shot_top1"), ("majority class", "majority_zero_shot_top1"))),
    _Spec("vae", "VAE val PSNR", "val_psnr", (("pretrained TAEF2 before its decoder was fine-tuned", "pretrained_val_psnr"),),
          show=lambda v: f"{v:.1f} dB", note=_vae_note),
    _Spec("dit_train", "DiT samples classified as their class", "sample_accuracy",
          (("the judge on real images", "real_accuracy"),
           ("on real images through the VAE", "reconstruction_accuracy"))),
    _Spec("dit_train", "DiT Fréchet distance (lower is better)", "frechet_distance",
          (("real vs real", "real_frechet_distance"),), show=lambda v: f"{v:.2f}"),
)


def _index_headlines(metrics: Metrics) -> list[Headline]:
    """One row per index target: its recall@10 against exact search (the baseline is 100% by definition)."""
    names = sorted({key.split("/")[0] for key in metrics if key.endswith("/recall_at_10")})
    return [Headline("index", f"{name} recall@10", _percent(metrics[f"{name}/recall_at_10"]),
                     f"exact search 100% ({metrics.get(f'{name}/qps', 0):,.0f} queries/s)") for name in names]


def headlines(results: Mapping[str, StageResult]) -> list[Headline]:
    """The headline rows for the stages in ``results`` (a pipeline run's), in pipeline order."""
    rows = []
    for spec in SPECS:
        result = results.get(spec.stage)
        if result is None or spec.key not in result.metrics:
            continue
        show = spec.show
        said = [f"{label} {show(result.metrics[key])}" for label, key in spec.baselines if key in result.metrics]
        said += [spec.note(result.metrics)] if spec.note else []
        rows.append(Headline(spec.stage, spec.measure, show(result.metrics[spec.key]), " · ".join(filter(None, said))))
    if "index" in results:
        rows += _index_headlines(results["index"].metrics)
    return rows


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def wall_times(results: Mapping[str, StageResult]) -> str:
    """"shard reused · mae_pretrain 3 min 29 s · … · stages total 9 min 48 s", and when stages ran side
    by side, how long they took from the first start to the last end ("…, 6 min 2 s elapsed")."""
    parts = [f"{name} {'reused' if result.reused else _duration(result.wall_s)}" for name, result in results.items()]
    total = sum(result.wall_s for result in results.values())
    timed = [result for result in results.values() if result.started_s]
    elapsed = max((r.started_s + r.wall_s for r in timed), default=0.0) - min((r.started_s for r in timed), default=0.0)
    overlap = f", {_duration(elapsed)} elapsed side by side" if total - elapsed > 1.0 else ""
    return " · ".join(parts + [f"stages total {_duration(total)}{overlap}"])


def text_table(rows: list[Headline]) -> str:
    """Aligned columns for a terminal."""
    header = Headline("stage", "measure", "value", "baseline")
    widths = [max(len(getattr(row, field)) for row in [header, *rows]) for field in ("stage", "measure", "value")]
    lines = [f"{row.stage:{widths[0]}}  {row.measure:{widths[1]}}  {row.value:>{widths[2]}}  {row.baseline}".rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def markdown_table(rows: list[Headline]) -> str:
    lines = ["| stage | measure | value | baseline |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {r.stage} | {r.measure} | {r.value} | {r.baseline} |" for r in rows])
