"""The comparison report from the runs' ``result.json``: comparison.md / .csv / .json, loss_curves.png and
f1_vs_memory.png. Several seeds of a variant give mean ± std (sample standard deviation) over its complete runs."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# (column, flat key, format) -- the seeds' table first, then ours.
SEED_COLUMNS = [("显卡占用/memory", "peak_mem_gb", "gib"), ("总参数", "all_params", "count"),
                ("可训练参数占比", "trainable_pct", "pct"), ("训练耗时", "train_seconds", "time"),
                ("测试结果F1", "sample_f1", "f1"), ("测试耗时", "test_seconds", "time")]
EXTENDED_COLUMNS = [("lr", "learning_rate", "lr"), ("trainable", "trainable_params", "count"),
                    ("samples/s", "samples_per_s", "rate"), ("tokens/s", "tokens_per_s", "rate"),
                    ("final loss", "final_loss", "f1"), ("best loss", "best_loss", "f1"),
                    ("micro P", "micro_precision", "f1"), ("micro R", "micro_recall", "f1"),
                    ("micro F1", "micro_f1", "f1"), ("F1 95% CI", "micro_f1_ci", "ci"),
                    ("parse fail", "parse_failure_rate", "share"), ("ckpt size", "checkpoint_bytes", "bytes")]
_EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt|Loss)(:|$)|: error: ")
_RANK = re.compile(r"^\[rank\d+\]:\s*")  # torch.distributed's prefix on a rank's traceback lines
_NOISE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]|\d+%\||^\s*warnings\.warn\(")


def last_error(text: str, returncode: int) -> str:
    """The line of a failed step's output that says why: the exception, else the last line that is not
    launcher noise (DeepSpeed's timestamped lines, progress bars)."""
    lines = [_RANK.sub("", line.rsplit("\r", 1)[-1]).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if _EXCEPTION.search(line):
            return line
    killed = re.findall(r"exits with return code = (-\d+)", text)
    if returncode < 0 or killed:
        return f"killed by signal {abs(int(killed[-1]) if killed else returncode)} (out of host memory?)"
    rest = [line for line in lines if not _NOISE.search(line)]
    return rest[-1] if rest else f"exit code {returncode}"


def flatten(result: dict) -> dict:
    """One run's numbers under flat names (the CSV's columns)."""
    train, scores = result.get("train", {}), result.get("metrics", {})
    flat = {k: result.get(k) for k in ("variant", "method", "seed", "status", "stage", "error", "learning_rate")}
    flat.update({k: train.get(k) for k in ("trainable_params", "all_params", "peak_mem_gb", "samples_per_s",
                                           "tokens_per_s", "final_loss", "best_loss", "steps", "world_size")})
    flat["trainable_pct"] = 100 * train["trainable_params"] / train["all_params"] if train else None
    flat["train_seconds"] = train.get("wall_seconds")
    flat.update({k: scores.get(k) for k in ("sample_f1", "micro_precision", "micro_recall", "micro_f1",
                                            "parse_failure_rate", "test_seconds", "n_records")})
    flat["micro_f1_ci_low"], flat["micro_f1_ci_high"] = scores.get("micro_f1_ci95") or (None, None)
    flat.update({k: result.get(k) for k in ("checkpoint_bytes", "train_process_s", "predict_process_s")})
    return flat


def aggregate(flats: list[dict]) -> dict[str, dict]:
    """variant -> {"runs", "ok", "errors", key: [values over its complete runs]}."""
    table: dict[str, dict] = {}
    for flat in flats:
        entry = table.setdefault(flat["variant"], {"runs": 0, "ok": 0, "errors": [], "values": {}})
        entry["runs"] += 1
        if flat["status"] != "ok":
            entry["errors"].append(f"seed {flat['seed']} failed in {flat['stage']}: {flat['error']}")
            continue
        entry["ok"] += 1
        for key, value in flat.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                entry["values"].setdefault(key, []).append(value)
    return table


def _one(value, kind: str) -> str:
    if kind == "gib":
        return f"{value:.2f} GiB"
    if kind == "count":
        scaled = (f"{value / d:.3f}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K")) if value >= d)
        return next(scaled, f"{value:g}")
    if kind == "pct":  # already a percentage (trainable_pct)
        return f"{value:.4f}%"
    if kind == "share":  # a fraction of 1 (metrics.json's parse_failure_rate), shown as a percentage
        return f"{100 * value:.2f}%"
    if kind == "time":
        return f"{value / 60:.1f} min" if value >= 600 else f"{value:.1f} s"
    if kind == "bytes":
        return f"{value / 2**20:.2f} MiB"
    if kind == "lr":
        return f"{value:g}"
    return f"{value:.1f}" if kind == "rate" else f"{value:.4f}"


def cell(values: dict[str, list], key: str, kind: str) -> str:
    """One value, or mean ± std where several seeds differ; a CI as low–high (means over seeds)."""
    if kind == "ci":
        low, high = values.get(f"{key}_low"), values.get(f"{key}_high")
        return f"{statistics.mean(low):.4f}–{statistics.mean(high):.4f}" if low and high else "—"
    found = values.get(key)
    if not found:
        return "—"
    if len(set(found)) == 1:
        return _one(found[0], kind)
    mean, std = _one(statistics.mean(found), kind), _one(statistics.stdev(found), kind)
    number, _, unit = mean.rpartition(" ")
    return f"{number if number and std.endswith(' ' + unit) else mean} ± {std}"  # "0.53 ± 0.01 GiB"


def markdown(table: dict[str, dict], settings: dict) -> str:
    columns = SEED_COLUMNS + EXTENDED_COLUMNS
    head = ["method", *(c[0] for c in columns), "seeds", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, entry in table.items():
        status = "; ".join(entry["errors"]).replace("|", "\\|")[:300] or "ok"
        values = [cell(entry["values"], key, kind) for _, key, kind in columns]
        lines.append("| " + " | ".join([variant, *values, f"{entry['ok']}/{entry['runs']}", status]) + " |")
    shared = ", ".join(f"{k} {settings[k]}" for k in ("num_train_epochs", "max_steps", "train_batch_size",
                       "gradient_accumulation_steps", "max_len", "max_src_len", "gradient_checkpointing",
                       "quantization_bit", "log_steps", "zero_stage", "num_gpus", "launcher") if k in settings)
    if settings.get("hostfile"):
        shared += f", hostfile {settings['hostfile']} ({settings.get('world_size')} ranks)"
    return "\n".join([
        "# Method comparison", "",
        f"Model `{settings['model_dir']}` on {settings['device']}; train `{settings['train_path']}`, test "
        f"`{settings['test_path']}` (limit {settings['limit'] or 'none'}); greedy decoding, max_new_tokens "
        f"{settings['max_new_tokens'] or 'max_len - max_src_len'}; seeds {settings['seeds']}.",
        f"Shared options: {shared}. Per-method options: {', '.join(settings['method_option']) or 'none'}.", "",
        "显卡占用/memory: peak GPU memory allocated by torch (on a CPU: peak resident set of the training process). "
        "训练耗时: the training loop's wall time (model loading excluded). 测试结果F1: the seeds' sample F1. "
        "测试耗时: generation time of the test file. lr: the method's default (tuner.DEFAULT_LR) unless overridden.",
        "", *lines, ""])


def plot_losses(results: list[dict], path: Path) -> None:
    """Every run's logged training loss, by optimizer step (left) and by wall time (right)."""
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    for r in results:
        history = r.get("train", {}).get("history", [])
        if r["status"] != "ok" or not history:
            continue
        style = {"color": f"C{variants.index(r['variant']) % 10}", "label": f"{r['variant']} (seed {r['seed']})",
                 "linestyle": ("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4],
                 "marker": "." if len(history) < 30 else None}
        loss = [h["train/loss"] for h in history]
        by_step.plot([h["step"] for h in history], loss, **style)
        by_time.plot([h["wall_s"] for h in history], loss, **style)
    for ax, label in ((by_step, "optimizer step"), (by_time, "wall time of the training loop (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.suptitle("Training loss per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_f1_memory(table: dict[str, dict], path: Path) -> None:
    """Test sample F1 against peak memory, one point per method (error bars: std over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (variant, entry) in enumerate(table.items()):
        mem, f1 = entry["values"].get("peak_mem_gb"), entry["values"].get("sample_f1")
        if not mem or not f1:
            continue
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (mem, f1)]
        ax.errorbar(statistics.mean(mem), statistics.mean(f1), xerr=spread[0], yerr=spread[1], fmt="o",
                    color=f"C{i}", capsize=4, label=variant)
    ax.set_title("Test F1 against peak memory (mean ± std over seeds)")
    ax.set_xlabel("peak memory, GiB (GPU: max allocated; CPU: peak resident set)")
    ax.set_ylabel("test sample F1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, results: list[dict], settings: dict) -> list[str]:
    """Write the five report files into ``out``; returns their paths."""
    flats = [flatten(r) for r in results]
    table = aggregate(flats)
    (out / "comparison.md").write_text(markdown(table, settings), encoding="utf-8")
    with open(out / "comparison.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(flats[0]))
        writer.writeheader()
        writer.writerows(flats)
    summary = {v: {"runs": e["runs"], "ok": e["ok"], "errors": e["errors"],
                   **{k: {"mean": statistics.mean(x), "std": statistics.stdev(x) if len(x) > 1 else 0.0, "n": len(x)}
                      for k, x in e["values"].items()}} for v, e in table.items()}
    document = {"settings": settings, "methods": summary, "runs": flats}
    (out / "comparison.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_losses(results, out / "loss_curves.png")
    plot_f1_memory(table, out / "f1_vs_memory.png")
    return [str(out / n) for n in ("comparison.md", "comparison.csv", "comparison.json", "loss_curves.png",
                                   "f1_vs_memory.png")]
