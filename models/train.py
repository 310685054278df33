"""`antiphon train`: AdamW + warmup/cosine over random windows, held-out eval, exact resume, DDP.

Single process:  antiphon train --data data/corpus --out runs/x
Multi-process:   torchrun --nproc_per_node N -m antiphon.daemon.cli train ...  (gloo on CPU, nccl on CUDA)

Only rank 0 writes (log, plot, checkpoints). A checkpoint is written at every evaluation
(`last.pt` with optimizer and RNG state for --resume; `best.pt`, weights only, by valid_perf).
Resume is exact: the data stream and dropout are seeded from (seed, rank, step), and the
optimizer and global RNG states come back from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import random
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from antiphon.daemon import cli
from antiphon.daemon import vocab as V
from antiphon.daemon.config import ModelConfig, TrainConfig, from_dict, to_dict
from antiphon.daemon.errors import UserError
from antiphon.models import data as D
from antiphon.models.checkpoint import load_checkpoint, model_config_of, save_checkpoint
from antiphon.models.gpt import GPT

# Paths and hardware may change between a run and its resumption; the rest must not, or the
# continued run would not be the run that was started.
RESUMABLE_OVERRIDES = ("data", "out", "device", "threads")


@dataclasses.dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(tcfg: TrainConfig) -> Env:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = tcfg.device if tcfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu")
    device = torch.device(f"cuda:{local}" if want == "cuda" else "cpu")
    if want == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    elif tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    if world > 1:
        dist.init_process_group("nccl" if want == "cuda" else "gloo")
    return Env(rank, world, local, device)


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr, then cosine down to min_lr at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: GPT, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Decay matrices only: LayerNorm gains and the (tied) embedding are not shrunk toward 0."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def rng_state() -> dict[str, Any]:
    # Plain lists and tensors only, so the checkpoint stays torch.load(weights_only=True)-able.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def oom_error(e: BaseException, t: TrainConfig) -> UserError | None:
    """Out-of-memory (CUDA or CPU allocator) becomes advice; None for any other error."""
    msg = str(e).lower()
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg:
        return UserError(f"batch_size {t.batch_size} too large for this device's memory, try "
                         f"--batch-size {max(1, t.batch_size // 2)} (or a shorter --seq-len)")
    return None


def step_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp) -> torch.Tensor:
    # Through the (possibly DDP-wrapped) forward, not GPT.loss, so DDP's gradient hooks run.
    with amp:
        logits, _ = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=V.PAD)


@torch.no_grad()
def evaluate(model: GPT, windows: np.ndarray, env: Env, batch_size: int, amp) -> float:
    """Mean nats/token over fixed windows, each rank scoring its share, summed across ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)  # (sum of nll, tokens)
    mine = windows[env.rank::env.world]
    for i in range(0, len(mine), batch_size):
        w = torch.from_numpy(mine[i:i + batch_size]).to(env.device)
        with amp:
            logits, _ = model(w[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), ignore_index=V.PAD, reduction="sum")
        total += torch.stack([nll.double(), (w[:, 1:] != V.PAD).sum().double()])
    if env.world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "context", "rope_base")


def init_weights(model: GPT, m: ModelConfig, path: str) -> str | None:
    """Load a checkpoint's weights to fine-tune from; returns its run id (the new run's parent)."""
    ck = load_checkpoint(path)  # refuses another vocabulary, naming both
    theirs = model_config_of(ck)
    clash = [f"{k} {getattr(theirs, k)!r} there, {getattr(m, k)!r} here" for k in SHAPE_FIELDS
             if getattr(theirs, k) != getattr(m, k)]
    if clash:
        raise UserError(f"--init {path}: its model shape differs from this run's ({'; '.join(clash)}); "
                        "give the same shape flags (or none: the checkpoint's shape is then taken)")
    model.load_state_dict(ck["model"])
    return ck.get("run_id")


def resolve_configs(args, out: Path) -> tuple[TrainConfig, ModelConfig, dict[str, Any] | None]:
    tcfg, mcfg = cli.configs(args, TrainConfig, ModelConfig)
    mcfg = dataclasses.replace(mcfg, vocab_size=V.VOCAB_SIZE)
    last = out / "last.pt"
    if tcfg.init and not getattr(args, "resume", False):
        # The checkpoint's shape, unless shape flags were given (init_weights then checks they agree).
        given_m = set(cli.read_config_file(getattr(args, "config", None)).get("ModelConfig", {}))
        given_m |= {k.split(".", 1)[1] for k in vars(args) if k.startswith("ModelConfig.")}
        theirs = model_config_of(load_checkpoint(tcfg.init))
        mcfg = dataclasses.replace(theirs, **{k: getattr(mcfg, k) for k in given_m if k != "vocab_size"},
                                   vocab_size=V.VOCAB_SIZE)
    if not getattr(args, "resume", False):
        if last.exists():
            raise UserError(f"{out} already holds a run (last.pt); pass --resume to continue it, "
                            "or choose another --out")
        return tcfg, mcfg, None
    if not last.exists():
        raise UserError(f"--resume: no checkpoint {last}; start the run without --resume")
    ck = load_checkpoint(last)  # refuses another vocabulary, truncated or foreign files
    saved = from_dict(TrainConfig, ck["train_config"])
    # Only settings given explicitly (flag or config file) count; the rest come from the run.
    given = set(cli.read_config_file(getattr(args, "config", None)).get("TrainConfig", {}))
    given |= {k.split(".", 1)[1] for k in vars(args) if k.startswith("TrainConfig.")}
    clash = [k for k in sorted(given - set(RESUMABLE_OVERRIDES)) if getattr(tcfg, k) != getattr(saved, k)]
    if clash:
        raise UserError(f"--resume continues the run as it was configured; these settings differ from "
                        f"{last}: {', '.join(f'{k} {getattr(saved, k)!r} -> {getattr(tcfg, k)!r}' for k in clash)}")
    tcfg = dataclasses.replace(saved, **{k: getattr(tcfg, k) for k in RESUMABLE_OVERRIDES if k in given})
    saved_m = model_config_of(ck)
    given_m = set(cli.read_config_file(getattr(args, "config", None)).get("ModelConfig", {}))
    given_m |= {k.split(".", 1)[1] for k in vars(args) if k.startswith("ModelConfig.")}
    clash = [k for k in sorted(given_m) if getattr(mcfg, k) != getattr(saved_m, k)]
    if clash:
        raise UserError(f"--resume cannot change the model's shape; {last} has "
                        f"{', '.join(f'{k}={getattr(saved_m, k)!r}' for k in clash)}")
    return tcfg, saved_m, ck


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Logger:
    """JSONL loss log (rank 0). On resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            rows = [r for r in self.rows() if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif enabled:
            path.write_text("")

    def rows(self) -> list[dict[str, Any]]:
        return read_log(self.path)

    def write(self, **row: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def main(args) -> int:
    out = Path(cli.configs(args, TrainConfig)[0].out)
    tcfg, mcfg, ck = resolve_configs(args, out)
    env = setup(tcfg)
    try:
        rc = train(tcfg, mcfg, env, ck, stop_at=getattr(args, "stop_at", 0) or 0)
        if dist.is_initialized():
            dist.barrier()  # leave together: a rank that exits early tears down a peer's pairs
        return rc
    finally:
        if dist.is_initialized():
            # DDP's reducer keeps the process group alive through reference cycles. Left to the
            # interpreter's teardown, gloo's worker threads die there, and a rank aborts with
            # "terminate called without an active exception" (seen in CI): free them now.
            gc.collect()
            dist.destroy_process_group()
            gc.collect()


def train(t: TrainConfig, m: ModelConfig, env: Env, ck: dict[str, Any] | None, stop_at: int = 0) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from antiphon.models.plots import plot_losses

    console = Console(stderr=True, width=None if os.isatty(2) else 120)
    out = Path(t.out)
    train_split = D.load_split(t.data, "train", t.seq_len + 1, with_kinds=t.perf_share > 0)
    windows = D.WindowSampler(train_split, t.seq_len, t.perf_share, t.augment)
    valid = {name: D.eval_windows(D.load_split(t.data, name, 2), t.eval_batches * t.batch_size, t.seq_len, t.seed)
             for name in ("valid_perf", "valid_score")}
    if t.seq_len > m.context:
        raise UserError(f"seq_len {t.seq_len} exceeds the model context {m.context}")

    torch.manual_seed(t.seed)
    model = GPT(m).to(env.device)
    opt = make_optimizer(model, t, env.device)
    start, best, wall, run_id = 0, math.inf, 0.0, None
    parent = init_weights(model, m, t.init) if t.init and ck is None else None
    if ck is not None:
        parent = ck.get("parent_run_id")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, best, wall, run_id = ck["step"], ck["best_valid_perf"], ck["wall_s"], ck["run_id"]
        set_rng_state(ck["rng"])
    ddp = model
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda" else nullcontext()
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"TrainConfig": to_dict(t), "ModelConfig": to_dict(m)}, indent=2))
    log = Logger(out / "log.jsonl", start if ck is not None else None, env.main)
    tokens_per_step = t.batch_size * t.seq_len * env.world

    def checkpoint(step: int, losses: dict[str, float]) -> None:
        nonlocal best, run_id
        improved = losses["valid_perf"] < best
        best = min(best, losses["valid_perf"])
        log.write(step=step, **losses, wall_s=round(wall, 2))
        if not env.main:
            return
        meta = {"step": step, "train_config": to_dict(t), "best_valid_perf": best, "wall_s": wall,
                "valid": losses, "tokens_seen": step * tokens_per_step, "parent_run_id": parent}
        if run_id is None:
            run_id = f"{int(time.time()):x}-{uuid.uuid4().hex[:6]}"  # a parent and its child may start in one second
        save_checkpoint(out / "last.pt", model, m, {**meta, "run_id": run_id, "optimizer": opt.state_dict(),
                                                    "rng": rng_state()})
        if improved:  # weights only: this is the file that ships
            save_checkpoint(out / "best.pt", model, m, {**meta, "run_id": run_id})
        plot_losses(log.rows(), out / "loss.png")

    def held_out() -> dict[str, float]:
        try:
            return {name: evaluate(model, w, env, t.batch_size, amp) for name, w in valid.items()}
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if oom_error(e, t) is None:
                raise
            raise oom_error(e, t) from e

    if env.main:
        console.print(f"[bold]antiphon train[/] {model.num_params() / 1e6:.2f}M params, {env.world} process(es) on "
                      f"{env.device}, {train_split.n_tokens:,} train tokens, steps {start}->{t.steps}")
    if ck is None:
        losses = held_out()
        log.write(step=0, **losses, wall_s=0.0)
        if env.main:
            console.print(f"step 0: valid_perf {losses['valid_perf']:.3f} valid_score {losses['valid_score']:.3f}")

    model.train()
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not env.main, transient=False) as bar:
        task = bar.add_task("train", total=t.steps, completed=start, info="")
        for step in range(start, t.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, t)
            for group in opt.param_groups:
                group["lr"] = lr
            rng = D.step_rng(t.seed, env.rank, step)
            torch.manual_seed(int(rng.integers(2**62)))  # dropout masks, per rank and step
            x, y = (torch.from_numpy(a).to(env.device) for a in windows.batch(t.batch_size, rng))
            try:
                loss = step_loss(ddp, x, y, amp)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
            except (RuntimeError, torch.OutOfMemoryError) as e:
                if oom_error(e, t) is None:
                    raise
                raise oom_error(e, t) from e
            loss_value = loss.item()
            dt = time.perf_counter() - t0
            wall += dt
            done = step + 1
            log.write(step=done, train_loss=round(loss_value, 5), lr=lr, grad_norm=round(float(gnorm), 4),
                      tokens_per_s=round(tokens_per_step / dt, 1))
            bar.update(task, completed=done,
                       info=f"loss {loss_value:.3f}  lr {lr:.2e}  {tokens_per_step / dt:,.0f} tok/s")
            if done % t.eval_every == 0 or done == t.steps or done == stop_at:
                losses = held_out()
                checkpoint(done, losses)
                if env.main:
                    bar.console.print(f"step {done}: train {loss_value:.3f} valid_perf {losses['valid_perf']:.3f} "
                                      f"valid_score {losses['valid_score']:.3f} best {best:.3f} "
                                      f"({wall / 60:.1f} min training)")
            if done == stop_at:
                break
    return 0
