"""The comparison report from the runs' ``result.json``: comparison.md / .csv / .json, loss_curves.png and
``<metric>_vs_memory.png`` (the task's headline metric: f1_vs_memory.png for the default task). Several seeds of a
variant give mean ± std (sample standard deviation) over its complete runs. The task (glmft.tasks) names the
headline metric, which fills the seeds' 测试结果 column, and the columns of its own."""

from __future__ import annotations

import csv
import json
import re
import statistics
import types
from pathlib import Path

import matplotlib

from glmft import tasks
from glmft.compare_cmd import KINDS, kind_of

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# (column, flat key, format): the seeds' table around the task's headline, then ours around the task's columns.
MEMORY_COLUMNS = [("显卡占用/memory", "peak_mem_gb", "gib"), ("总参数", "all_params", "count"),
                  ("可训练参数占比", "trainable_pct", "pct"), ("训练耗时", "train_seconds", "time")]
TEST_TIME = ("测试耗时", "test_seconds", "time")
RUN_COLUMNS = [("lr", "learning_rate", "lr"), ("trainable", "trainable_params", "count"),
               ("samples/s", "samples_per_s", "rate"), ("tokens/s", "tokens_per_s", "rate"),
               ("final loss", "final_loss", "f1"), ("best loss", "best_loss", "f1")]
# Forgetting (metrics.json's ``retention``, from predict --retention_path): every task has them; "—" without it.
RETENTION_COLUMNS = [("forgetting ΔNLL", "nll_delta", "f1"), ("answers changed", "changed_rate", "share")]
RETENTION_NOTE = ("forgetting ΔNLL: on the general prompts of --retention_path, the model's mean per-token negative "
                  "log-likelihood of the base model's greedy answers minus the base model's own (> 0: it moved away; "
                  "0 for the base row by definition); answers changed: the share of those prompts whose greedy answer "
                  "is no longer the base's; — where not measured.")
CKPT_SIZE = ("ckpt size", "checkpoint_bytes", "bytes")
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


def task_of(results: list[dict], settings: dict) -> types.ModuleType:
    """The task the runs were scored by: recorded in their metrics.json (from the checkpoint's meta.json), else
    compare's --task."""
    recorded = [r["metrics"]["task"] for r in results if r.get("metrics", {}).get("task")]
    return tasks.get(recorded[0] if recorded else settings.get("task", tasks.DEFAULT))


def columns(task: types.ModuleType) -> list[tuple[str, str, str]]:
    """Every column of the table: the seeds' (测试结果 = the headline), then the run's, the task's, forgetting and the
    size."""
    head = next(c for c in task.COLUMNS if c[0] == task.HEADLINE)
    own = [(header, key, kind) for key, header, kind in task.COLUMNS if key != task.HEADLINE]
    return [*MEMORY_COLUMNS, (f"测试结果{head[1]}", head[0], head[2]), TEST_TIME, *RUN_COLUMNS, *own,
            *RETENTION_COLUMNS, CKPT_SIZE]


def flatten(result: dict, task: types.ModuleType | None = None) -> dict:
    """One run's numbers under flat names (the CSV's columns); an interval becomes ``<key>_low`` / ``<key>_high``."""
    task = task or tasks.get(tasks.DEFAULT)
    train, scores = result.get("train", {}), result.get("metrics", {})
    flat = {k: result.get(k) for k in ("variant", "method", "seed", "status", "stage", "error", "learning_rate")}
    flat["kind"] = kind_of(result.get("variant", ""))
    flat.update({k: train.get(k) for k in ("trainable_params", "all_params", "peak_mem_gb", "samples_per_s",
                                           "tokens_per_s", "final_loss", "best_loss", "steps", "world_size")})
    flat["trainable_pct"] = 100 * train["trainable_params"] / train["all_params"] if train else None
    flat["train_seconds"] = train.get("wall_seconds")
    for key, _, kind in task.COLUMNS:
        if kind == "ci":
            flat[f"{key}_low"], flat[f"{key}_high"] = scores.get(key) or (None, None)
        else:
            flat[key] = scores.get(key)
    flat.update({k: scores.get(k) for k in ("test_seconds", "n_records")})
    flat.update({k: (scores.get("retention") or {}).get(k) for _, k, _ in RETENTION_COLUMNS})
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
    if kind == "score":  # already x100 (ROUGE, BLEU)
        return f"{value:.2f}"
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


def grouped(table: dict[str, dict]) -> dict[str, dict]:
    """The rows in the report's order: the base row, then the methods by kind (selective, soft prompts, additive
    modules, reparameterised, full), the order of the runs within a kind."""
    order = list(KINDS)
    rank = {v: (0, 0) if v == "base" else (1, order.index(kind_of(v)) if kind_of(v) else len(order)) for v in table}
    return dict(sorted(table.items(), key=lambda item: rank[item[0]]))


def markdown(table: dict[str, dict], settings: dict, task: types.ModuleType | None = None) -> str:
    task = task or tasks.get(settings.get("task", tasks.DEFAULT))
    cols = columns(task)
    head = ["method", "kind", *(c[0] for c in cols), "seeds", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, entry in grouped(table).items():
        status = "; ".join(entry["errors"]).replace("|", "\\|")[:300] or "ok"
        values = [cell(entry["values"], key, kind) for _, key, kind in cols]
        group = kind_of(variant) or ("—" if variant == "base" else "?")
        lines.append("| " + " | ".join([variant, group, *values, f"{entry['ok']}/{entry['runs']}", status]) + " |")
    shared = ", ".join(f"{k} {settings[k]}" for k in ("num_train_epochs", "max_steps", "train_batch_size",
                       "gradient_accumulation_steps", "max_len", "max_src_len", "gradient_checkpointing",
                       "quantization_bit", "log_steps", "zero_stage", "num_gpus", "launcher") if k in settings)
    if settings.get("hostfile"):
        shared += f", hostfile {settings['hostfile']} ({settings.get('world_size')} ranks)"
    headline = cols[len(MEMORY_COLUMNS)]
    base = " The base row scores the untuned base model (no training)." if "base" in table else ""
    return "\n".join([
        "# Method comparison", "",
        f"Task {task.NAME}. Model `{settings['model_dir']}` on {settings['device']}; train `{settings['train_path']}`, "
        f"test `{settings['test_path']}` (limit {settings['limit'] or 'none'}); greedy decoding, max_new_tokens "
        f"{settings['max_new_tokens'] or 'max_len - max_src_len'}; seeds {settings['seeds']}.",
        f"Shared options: {shared}. Per-method options: {', '.join(settings['method_option']) or 'none'}.", "",
        "显卡占用/memory: peak GPU memory allocated by torch (on a CPU: peak resident set of the training process). "
        f"训练耗时: the training loop's wall time (model loading excluded). {headline[0]}: the task's headline metric "
        f"({headline[1]}). 测试耗时: generation time of the test file. lr: the method's default (tuner.DEFAULT_LR) "
        f"unless overridden.{base} {RETENTION_NOTE}",
        "", *lines, ""])


def color(index: int, count: int):
    """Matplotlib's ten default colours, or twenty paired ones when more methods share a plot (--methods all)."""
    return f"C{index % 10}" if count <= 10 else plt.get_cmap("tab20")(index % 20)


def plot_losses(results: list[dict], path: Path) -> None:
    """Every run's logged training loss, by optimizer step (left) and by wall time (right)."""
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    for r in results:
        history = r.get("train", {}).get("history", [])
        if r["status"] != "ok" or not history:
            continue
        style = {"color": color(variants.index(r["variant"]), len(variants)),
                 "label": f"{r['variant']} (seed {r['seed']})",
                 "linestyle": ("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4],
                 "marker": "." if len(history) < 30 else None}
        loss = [h["train/loss"] for h in history]
        by_step.plot([h["step"] for h in history], loss, **style)
        by_time.plot([h["wall_s"] for h in history], loss, **style)
    for ax, label in ((by_step, "optimizer step"), (by_time, "wall time of the training loop (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    if by_step.get_legend_handles_labels()[0]:  # none when no run has a loss history (the base row alone)
        by_step.legend(fontsize=8)
    fig.suptitle("Training loss per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_memory(table: dict[str, dict], path: Path, key: str, header: str) -> None:
    """The headline metric against peak memory, one point per method (error bars: std over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (variant, entry) in enumerate(table.items()):
        mem, metric = entry["values"].get("peak_mem_gb"), entry["values"].get(key)
        if not mem or not metric:
            continue
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (mem, metric)]
        ax.errorbar(statistics.mean(mem), statistics.mean(metric), xerr=spread[0], yerr=spread[1], fmt="o",
                    color=color(i, len(table)), capsize=4, label=variant)
    ax.set_title(f"Test {header} against peak memory (mean ± std over seeds)")
    ax.set_xlabel("peak memory, GiB (GPU: max allocated; CPU: peak resident set)")
    ax.set_ylabel(f"test {header} ({key})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, results: list[dict], settings: dict) -> list[str]:
    """Write the five report files into ``out``; returns their paths."""
    task = task_of(results, settings)
    flats = [flatten(r, task) for r in results]
    table = aggregate(flats)
    (out / "comparison.md").write_text(markdown(table, settings, task), encoding="utf-8")
    with open(out / "comparison.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(flats[0]))
        writer.writeheader()
        writer.writerows(flats)
    summary = {v: {"runs": e["runs"], "ok": e["ok"], "errors": e["errors"],
                   **{k: {"mean": statistics.mean(x), "std": statistics.stdev(x) if len(x) > 1 else 0.0, "n": len(x)}
                      for k, x in e["values"].items()}} for v, e in table.items()}
    document = {"settings": settings, "task": task.NAME, "methods": summary, "runs": flats}
    (out / "comparison.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_losses(results, out / "loss_curves.png")
    key, header = next((k, h) for k, h, _ in task.COLUMNS if k == task.HEADLINE)
    plot = f"{header.lower()}_vs_memory.png"
    plot_metric_memory(table, out / plot, key, header)
    return [str(out / n) for n in ("comparison.md", "comparison.csv", "comparison.json", "loss_curves.png", plot)]
