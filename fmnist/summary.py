"""What a training run reached, from its history (metrics.jsonl's rows): one summary, which `fmnist train` prints
and a sweep keeps in its study for the table."""

GOAL = 0.90   # the test accuracy whose first epoch the summary names


def summarize(history: list[dict]) -> dict:
    """The final and best test accuracy, the training time and speed, the compile time apart, and when the
    test accuracy first reached GOAL (None where it did not); plain types only, so a study can store it."""
    best = max(history, key=lambda row: row["test_accuracy"])
    reached = next((i for i, row in enumerate(history) if row["test_accuracy"] >= GOAL), None)
    return {
        "epochs_done": len(history),
        "final_test_accuracy": history[-1]["test_accuracy"],
        "final_test_loss": history[-1]["test_loss"],
        "best_test_accuracy": best["test_accuracy"], "best_epoch": best["epoch"],
        "train_seconds": sum(row["train_seconds"] for row in history),   # the epochs' training passes only
        "samples_per_second": sum(row["samples_per_second"] for row in history) / len(history),   # mean of epochs
        "compile_seconds": sum(row.get("compile_seconds", 0.0) for row in history),   # older runs lack it
        "goal_epoch": None if reached is None else history[reached]["epoch"],
        "goal_seconds": None if reached is None else sum(row["train_seconds"] for row in history[:reached + 1]),
        "curve": [row["test_accuracy"] for row in history],
    }
