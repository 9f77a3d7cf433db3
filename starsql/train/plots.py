"""Training curves: loss (train and eval) and learning rate against step, from the Trainer's log."""

from pathlib import Path


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """Draw `training_curves.png`; returns None when nothing was logged yet."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    lrs = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e]
    if not train and not evals:
        return None
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
    if train:
        ax_loss.plot(*zip(*train), label="train loss")
    if evals:
        ax_loss.plot(*zip(*evals), "o-", label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if lrs:
        ax_lr.plot(*zip(*lrs), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle("Training curves")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
