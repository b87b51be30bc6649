"""What a training run prints: a progress bar over its batches and one line of
validation errors (meV units) per validated epoch."""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["format_metrics", "progress_bar", "report_epoch"]


def format_metrics(metrics: dict[str, float]) -> str:
    """``E 1.23 meV/atom | F 45.6 meV/Å | S 0.12 meV/Å³`` from RMSEs in eV units."""
    parts = []
    for name, short, unit in (
        ("energy_per_atom", "E", "meV/atom"),
        ("forces", "F", "meV/Å"),
        ("stress", "S", "meV/Å³"),
    ):
        if f"{name}_rmse" in metrics:
            parts.append(f"{short} {1000 * metrics[f'{name}_rmse']:.3g} {unit}")
    return " | ".join(parts)


def report_epoch(
    epoch: int,
    train_loss: float,
    metrics: dict[str, float],
    bar: tqdm | None,
    progress: bool,
) -> None:
    """The epoch's line: above the progress bar, or printed without one."""
    message = (
        f"epoch {epoch:>4} | loss {train_loss:.4g} | val {format_metrics(metrics)}"
    )
    if bar is not None and not bar.disable:
        bar.set_postfix_str(format_metrics(metrics))
        bar.write(message)
    elif progress:
        print(message, flush=True)


def progress_bar(enabled: bool, total: int, initial: int) -> tqdm | None:
    """A bar over every batch of the run, starting at ``initial`` (resumed)."""
    if not enabled:
        return None
    # disable=None: a bar on terminals, the per-epoch lines alone in log files
    return tqdm(
        total=total,
        initial=initial,
        unit="batch",
        dynamic_ncols=True,
        desc="training",
        disable=None,
    )
