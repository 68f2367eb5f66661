#!/usr/bin/env python
"""Train the shipped digits models, reproducibly by seed, and write them as package assets.

    python scripts/train_digits.py dit         [--steps 4000] [--seed 0] [--work out/train_digits]
    python scripts/train_digits.py classifier  [--epochs 40]  [--seed 0]

``dit`` trains the class-conditional digits DiT (resumable: rerun the same command after a kill) and writes
its EMA weights to ``treeq_engine/assets/digits_dit.safetensors`` plus ``digits_dit.json`` (config, training
settings, loss curve, wall time). ``classifier`` trains the small CNN the metrics use and writes
``digits_classifier.safetensors`` / ``.json``. ``--assets DIR`` writes elsewhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def train_dit(args: argparse.Namespace) -> None:
    from treeq_engine.models.checkpoint import save_dit_safetensors
    from treeq_engine.models.diffusion import create_diffusion
    from treeq_engine.models.digits import DIGITS_DIT, DIT_ASSET, digits_split
    from treeq_engine.models.dit import DiT
    from treeq_engine.models.train import TrainConfig, train_dit as run

    split = digits_split()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    torch.manual_seed(args.seed)  # the initial weights
    model = DiT(DIGITS_DIT)
    t0 = time.time()
    ema, record = run(model, split.train_x, split.train_y, create_diffusion(""), cfg, args.work)
    out = Path(args.assets)
    out.mkdir(parents=True, exist_ok=True)
    save_dit_safetensors(ema, out / f"{DIT_ASSET}.safetensors")
    meta = {"config": DIGITS_DIT.to_dict(), "train": dataclasses.asdict(cfg),
            "data": {"train_images": int(split.train_x.shape[0]), "held_out": int(split.test_x.shape[0])},
            "weights": "EMA", "train_seconds": round(float(record["seconds"]), 1),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "loss_every_50_steps": [round(v, 5) for v in record["loss"]]}
    (out / f"{DIT_ASSET}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out / DIT_ASSET}.safetensors ({record['seconds']:.0f} s of training; this call {time.time() - t0:.0f} s)")


def train_classifier(args: argparse.Namespace) -> None:
    from treeq_engine.models.classifier import save_classifier, train_classifier as run
    from treeq_engine.models.digits import CLASSIFIER_ASSET, digits_split

    split = digits_split()
    model, record = run(split, epochs=args.epochs, seed=args.seed)
    record["threads"] = torch.get_num_threads()
    out = Path(args.assets)
    out.mkdir(parents=True, exist_ok=True)
    save_classifier(model, out / f"{CLASSIFIER_ASSET}.safetensors", record)
    print(f"wrote {out / CLASSIFIER_ASSET}.safetensors: held-out accuracy {record['test_accuracy']:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["dit", "classifier"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", default=str(ROOT / "treeq_engine" / "assets"))
    p.add_argument("--work", default=str(ROOT / "out" / "train_digits"), help="resumable training state (dit)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, more threads mostly wait on each other)")
    p.add_argument("--epochs", type=int, default=40)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"dit": train_dit, "classifier": train_classifier}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
