"""Does stage 1 learn? Held-out transfer of meta-trained prompts (method.md 6).

Synthesises KADID-style distortions (``grmpiqa synth``) of two *disjoint* sets of pristine
images, pre-trains on the first and scores the second: SRCC and KRCC of the scores
against the severity labels, per distortion type and overall, for

* ``untrained``: the initial prompts (the starting point of both variants),
* ``reptile``: ``grmpiqa.pretrain`` with the default :class:`PretrainConfig`,
* ``released``: ``variant="released"`` with the authors' hyper-parameters,
* ``probe``: no prompts at all: a ridge regression from the frozen image embeddings
  (untrained prompts, the model's eval transform) to the labels, fitted on the
  pre-training images (its penalty chosen by 4-fold cross-validation grouped by scene)
  and applied to the held-out ones: how much a linear read-out of the same frozen
  features can rank unseen content,
* ``probe/type``: the same with one regression per distortion type, the most a linear
  read-out that knows the type can do,

plus how far theta moved in every epoch (L2 norm of theta - theta_0 and of the epoch's
step, from the run's log records). Each seed draws a fresh random backbone and prompt
initialisation (``create_model(seed=s)``) and the pre-training seed ``s``; the table
gives the mean and standard deviation over seeds.

Default data: the 24 Kodak images of ../shared/data/pristine/kodak, sorted by name, the
first 12 for pre-training and the last 12 held out; each is downscaled (Lanczos) so that
its longer side is ``--size`` pixels (288) before the distortions are applied, so that
they are made at about the scale the model sees (224 px); ``--size 0`` keeps the
originals. Any two folders can be given instead (``--train-pristine``, ``--heldout-
pristine``); a file in both is an error.

Usage::

    python benchmarks/stage1_transfer.py                          # tiny random backbone
    python benchmarks/stage1_transfer.py --seeds 0 1 2 --epochs 20
    python benchmarks/stage1_transfer.py --backbone ViT-B-16-quickgelu --pretrained FILE

Prints tables, then as the LAST stdout line one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

VARIANTS = ("reptile", "released")
METHODS = ("untrained", "reptile", "released", "probe", "probe/type")
LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def _shared_data() -> Path:
    env = os.environ.get("GRMPIQA_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _images(folder: Path) -> list[Path]:
    from grmpiqa.images import is_image_file

    if not folder.is_dir():
        raise SystemExit(f"stage1_transfer: {folder}: pristine folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise SystemExit(f"stage1_transfer: {folder}: no images")
    return files


def pristine_sets(args: argparse.Namespace) -> tuple[list[Path], list[Path], str]:
    """(pre-training images, held-out images, description); disjoint by content."""
    if args.train_pristine or args.heldout_pristine:
        if not (args.train_pristine and args.heldout_pristine):
            raise SystemExit("stage1_transfer: give both --train-pristine and --heldout-pristine")
        train, held = _images(Path(args.train_pristine)), _images(Path(args.heldout_pristine))
        desc = f"{args.train_pristine} (pre-training) / {args.heldout_pristine} (held out)"
    else:
        kodak = Path(args.kodak) if args.kodak else _shared_data() / "pristine" / "kodak"
        files = _images(kodak)
        half = len(files) // 2
        if half < 2:
            raise SystemExit(f"stage1_transfer: {kodak}: need at least 4 images")
        train, held = files[:half], files[half : 2 * half]
        desc = (
            f"Kodak halves: {train[0].name}..{train[-1].name} (pre-training), "
            f"{held[0].name}..{held[-1].name} (held out)"
        )
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in train + held}
    same = {digests[p] for p in train} & {digests[p] for p in held}
    if same:
        raise SystemExit("stage1_transfer: the two pristine sets share an image")
    return train, held, desc


def make_set(files: list[Path], out: Path, size: int, types: list[str] | None, seed: int) -> str:
    """Downscale ``files`` into out/pristine and synthesise out/set; returns its spec."""
    from grmpiqa.data.synth import synthesize

    pristine = out / "pristine"
    pristine.mkdir(parents=True, exist_ok=True)
    for p in files:
        with Image.open(p) as im:
            img = im.convert("RGB")
        if size > 0 and max(img.size) > size:
            s = size / max(img.size)
            img = img.resize(
                (round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS
            )
        img.save(pristine / f"{p.stem}.png")
    result = synthesize(pristine, out / "set", types=types, seed=seed, progress=False)
    return result.spec


def heldout_metrics(scores: np.ndarray, labels: np.ndarray, types: list[str]) -> dict[str, Any]:
    """SRCC/KRCC per distortion type, their means, and pooled over all held-out images."""
    from scipy.stats import kendalltau, spearmanr

    t = np.asarray(types)
    per: dict[str, dict[str, float]] = {}
    for g in sorted(set(types)):
        m = t == g
        per[g] = {
            "srcc": float(spearmanr(scores[m], labels[m])[0]),
            "krcc": float(kendalltau(scores[m], labels[m])[0]),
        }
    return {
        "per_type": per,
        "srcc_mean_per_type": float(np.nanmean([v["srcc"] for v in per.values()])),
        "krcc_mean_per_type": float(np.nanmean([v["krcc"] for v in per.values()])),
        "srcc_pooled": float(spearmanr(scores, labels)[0]),
        "krcc_pooled": float(kendalltau(scores, labels)[0]),
    }


def embeddings(model: Any, ds: Any, batch_size: int) -> np.ndarray:
    """Frozen L2-normalised image embeddings (eval transform) of every image of ``ds``."""
    import torch

    from grmpiqa.pipeline import ImageLoader

    model.eval()
    out = []
    loader = ImageLoader(
        ds.paths, model.preprocess, model.device, batch_size, decode="pil", reduced_decode=False
    )
    with torch.no_grad():
        for b in loader:
            out.append(model.encode_image(b.pixels).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def _ridge(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, lam: float) -> np.ndarray:
    """Ridge regression on standardised features, fitted on (xa, ya), applied to xb."""
    mu, sd = xa.mean(0), xa.std(0) + 1e-8
    a, b = (xa - mu) / sd, (xb - mu) / sd
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (ya - ya.mean()))
    return b @ w + ya.mean()


def fit_probe(x: np.ndarray, y: np.ndarray, refs: list[str], folds: int = 4) -> tuple[float, float]:
    """The ridge penalty with the best mean per-fold SRCC (folds grouped by scene), and
    that SRCC: how well the pre-training images alone say a type is linearly rankable."""
    from scipy.stats import spearmanr

    scenes = sorted(set(refs))
    fold_of = {r: i % folds for i, r in enumerate(scenes)}
    f = np.asarray([fold_of[r] for r in refs])
    best, best_lam = -np.inf, LAMBDAS[0]
    for lam in LAMBDAS:
        vals = []
        for k in range(min(folds, len(scenes))):
            tr, te = f != k, f == k
            if tr.sum() < 2 or te.sum() < 2:
                continue
            vals.append(spearmanr(_ridge(x[tr], y[tr], x[te], lam), y[te])[0])
        m = float(np.nanmean(vals)) if vals else -np.inf
        if m > best:
            best, best_lam = m, lam
    return best_lam, float(best)


def probe_scores(
    x_train: np.ndarray, train: Any, x_held: np.ndarray, held: Any, per_type: bool
) -> tuple[np.ndarray, dict[str, float], dict[str, float]]:
    """Held-out predictions of the linear probe(s), the penalties chosen and their
    cross-validated SRCC on the pre-training images."""
    y = np.asarray(train.labels, dtype=np.float64)
    refs = [str(it.ref) for it in train.items]
    if not per_type:
        lam, cv = fit_probe(x_train, y, refs)
        return _ridge(x_train, y, x_held, lam), {"all": lam}, {"all": cv}
    pred = np.zeros(len(held))
    lams: dict[str, float] = {}
    cvs: dict[str, float] = {}
    t_train, t_held = _types_of(train), _types_of(held)
    for g in sorted(set(t_held)):
        a = np.asarray([t == g for t in t_train])
        b = np.asarray([t == g for t in t_held])
        scenes = [r for r, m in zip(refs, a, strict=True) if m]
        lams[g], cvs[g] = fit_probe(x_train[a], y[a], scenes)
        pred[b] = _ridge(x_train[a], y[a], x_held[b], lams[g])
    return pred, lams, cvs


def _prompts(model: Any) -> dict[str, Any]:
    import grmpiqa

    names = set(model.parameter_names(grmpiqa.STAGE1_GROUPS))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def run_seed(
    args: argparse.Namespace, seed: int, train: Any, train_spec: str, held: Any, tmp: Path
) -> dict[str, Any]:
    import grmpiqa

    def fresh() -> grmpiqa.QualityModel:
        config = None
        if args.vpt_tokens is not None:
            config = grmpiqa.ModelConfig(vpt_tokens=args.vpt_tokens)
        pretrained = None if args.pretrained == "random" else args.pretrained
        return grmpiqa.create_model(args.backbone, pretrained=pretrained, seed=seed, config=config)

    types = _types_of(held)
    labels = np.asarray(held.labels, dtype=np.float64)
    rec: dict[str, Any] = {"seed": seed, "methods": {}}
    model = fresh()
    theta0 = _prompts(model)
    scores = model.score(held.paths, batch_size=args.batch_size).numpy()
    rec["methods"]["untrained"] = heldout_metrics(scores, labels, types)
    rec["vpt_tokens"] = model.config.vpt_tokens
    x_train = embeddings(model, train, args.batch_size)
    x_held = embeddings(model, held, args.batch_size)
    for method, per_type in (("probe", False), ("probe/type", True)):
        pred, lams, cvs = probe_scores(x_train, train, x_held, held, per_type)
        rec["methods"][method] = heldout_metrics(pred, labels, types)
        rec["methods"][method]["ridge_penalty"] = lams
        rec["methods"][method]["cv_srcc_pretraining"] = cvs
    for variant in args.variants:
        epochs = args.epochs if variant == "reptile" else args.released_epochs
        overrides = args.overrides if variant == "reptile" else {}
        cfg = grmpiqa.PretrainConfig(epochs=epochs, variant=variant, seed=seed, **overrides)
        model = fresh()
        t0 = time.perf_counter()
        result = grmpiqa.pretrain(
            model, [train_spec], cfg, tmp / f"{variant}-{seed}.safetensors", progress=False
        )
        seconds = time.perf_counter() - t0
        scores = model.score(held.paths, batch_size=args.batch_size).numpy()
        m = heldout_metrics(scores, labels, types)
        now = _prompts(model)
        m["max_abs_displacement"] = max(float((now[n] - theta0[n]).abs().max()) for n in now)
        m["config"] = cfg.to_dict()
        m["seconds"] = round(seconds, 1)
        m["epochs"] = [
            {
                "epoch": h["epoch"],
                "support_loss": h["support_loss"],
                "query_loss": h["query_loss"],
                "displacement": h.get("displacement"),
                "step": h.get("step"),
                "inner_displacement": h.get("inner_displacement"),
                "outer_lr": h.get("outer_lr"),
            }
            for h in result.history
        ]
        rec["methods"][variant] = m
    return rec


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs as PretrainConfig keyword arguments (values parsed as JSON,
    else kept as strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key in ("epochs", "variant", "seed"):
            raise SystemExit(
                f"stage1_transfer: --set {pair!r}: want FIELD=VALUE (not epochs, "
                "variant or seed, which have their own flags)"
            )
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    import grmpiqa

    try:  # fail before the synthesis, not after it
        grmpiqa.PretrainConfig(**out)
    except (TypeError, grmpiqa.GrmpiqaError) as err:
        raise SystemExit(f"stage1_transfer: --set: {err}") from None
    return out


def _types_of(ds: Any) -> list[str]:
    out = [""] * len(ds)
    for g, idx in ds.groups().items():
        for i in idx:
            out[i] = str(g)
    return out


def _ms(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    m, s = _ms(values)
    return f"{m:+.3f}+-{s:.3f}" if len(values) > 1 else f"{m:+.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kodak", default=None, help="Kodak folder (default ../shared/data/...)")
    ap.add_argument("--train-pristine", default=None, metavar="DIR")
    ap.add_argument("--heldout-pristine", default=None, metavar="DIR")
    ap.add_argument(
        "--size",
        type=int,
        default=288,
        help="downscale pristine images to this longer side before synthesis (0: keep)",
    )
    ap.add_argument("--types", nargs="+", default=None, help="distortion types (default all 25)")
    ap.add_argument("--epochs", type=int, default=20, help="reptile epochs (default 20)")
    ap.add_argument(
        "--released-epochs", type=int, default=None, help="released epochs (default: --epochs)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backbone", default="test-tiny")
    ap.add_argument(
        "--pretrained", default="random", help="'random' (default) or a weights FILE / tag"
    )
    ap.add_argument(
        "--vpt-tokens",
        type=int,
        default=None,
        help="visual prompt tokens (default: 4 on test-tiny, as in the tests; else the model's)",
    )
    ap.add_argument("--batch-size", type=int, default=64, help="scoring batch size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--work", default=None, help="keep the synthesised sets here")
    ap.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="pre-training variants to run (default both; none: untrained and probes only)",
    )
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="override PretrainConfig fields of the reptile runs (e.g. inner_lr=1e-4 "
        "outer_lr=0.01 inner_passes=1 support_batch=75 query_batch=50): a step-size sweep",
    )
    args = ap.parse_args()
    args.overrides = _overrides(args.set)
    methods = ["untrained", *args.variants, "probe", "probe/type"]
    if args.released_epochs is None:
        args.released_epochs = args.epochs
    if args.vpt_tokens is None and args.backbone == "test-tiny":
        args.vpt_tokens = 4

    import torch

    import grmpiqa
    from grmpiqa.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    load_before = [round(x, 2) for x in os.getloadavg()]
    train_files, held_files, desc = pristine_sets(args)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        work = Path(args.work) if args.work else Path(tmpdir)
        t0 = time.perf_counter()
        train_spec = make_set(train_files, work / "train", args.size, args.types, 0)
        held_spec = make_set(held_files, work / "heldout", args.size, args.types, 0)
        synth_s = time.perf_counter() - t0
        held = load_dataset(held_spec)
        train = load_dataset(train_spec)
        runs = []
        for seed in args.seeds:
            print(f"stage1_transfer: seed {seed} ...", file=sys.stderr, flush=True)
            runs.append(run_seed(args, seed, train, train_spec, held, Path(tmpdir)))
    total_s = time.perf_counter() - t_all

    type_ids = sorted(runs[0]["methods"]["untrained"]["per_type"])
    from grmpiqa.data.synth import TYPE_NAMES

    def col(method: str, key: str, g: str | None = None) -> list[float]:
        if g is None:
            return [r["methods"][method][key] for r in runs]
        return [r["methods"][method]["per_type"][g][key] for r in runs]

    n = len(runs)
    print(
        f"Stage-1 transfer: {args.backbone} ({args.pretrained} weights), "
        f"{runs[0]['vpt_tokens']} VPT tokens; {desc}; pristine longer side "
        f"{args.size or 'original'} px; reptile {args.epochs} epochs, released "
        f"{args.released_epochs} epochs; seeds {args.seeds} (mean+-sd over {n})"
        + (f"; reptile overrides {args.overrides}" if args.overrides else "")
    )
    head = f"{'type':<32}" + "".join(f"{m + ' SRCC':>18}" for m in methods)
    head += "".join(f"{m + ' KRCC':>18}" for m in methods)
    print(head)
    for g in type_ids:
        name = f"{g} {TYPE_NAMES[int(g) - 1]}" if g.isdigit() and 0 < int(g) <= 25 else g
        row = f"{name:<32}" + "".join(f"{_fmt(col(m, 'srcc', g)):>18}" for m in methods)
        row += "".join(f"{_fmt(col(m, 'krcc', g)):>18}" for m in methods)
        print(row)
    for label, skey, kkey in (
        ("mean over types", "srcc_mean_per_type", "krcc_mean_per_type"),
        ("pooled (all images)", "srcc_pooled", "krcc_pooled"),
    ):
        row = f"{label:<32}" + "".join(f"{_fmt(col(m, skey)):>18}" for m in methods)
        row += "".join(f"{_fmt(col(m, kkey)):>18}" for m in methods)
        print(row)
    gains: dict[str, Any] = {}
    print("\nGain over untrained prompts (same seed), mean+-sd over seeds:")
    for variant in methods[1:]:
        gains[variant] = {}
        for key in ("srcc_mean_per_type", "srcc_pooled", "krcc_pooled"):
            diffs = [r["methods"][variant][key] - r["methods"]["untrained"][key] for r in runs]
            m, s = _ms(diffs)
            gains[variant][key] = {"mean": m, "sd": s, "min": min(diffs), "values": diffs}
        g_v = gains[variant]
        print(
            f"  {variant:<9} mean-over-types SRCC {_fmt(g_v['srcc_mean_per_type']['values'])}"
            f"   pooled SRCC {_fmt(g_v['srcc_pooled']['values'])}"
            f"   (min over seeds {g_v['srcc_mean_per_type']['min']:+.3f})"
        )
    cv = {
        g: _ms([r["methods"]["probe/type"]["cv_srcc_pretraining"][g] for r in runs])[0]
        for g in type_ids
    }
    ranked = sorted(type_ids, key=lambda g: -cv[g])
    print(
        "\nTypes by the per-type probe's cross-validated SRCC on the PRE-TRAINING images "
        "(mean over seeds): " + ", ".join(f"{g} {cv[g]:+.2f}" for g in ranked)
    )
    print(
        "\nDisplacement of theta per epoch (L2 norm, mean over seeds): |theta_e - theta_0| / step"
    )
    print(
        f"{'epoch':>6}" + "".join(f"{v + ' |th-th0|':>22}{v + ' step':>18}" for v in args.variants)
    )
    epochs_tab = max(args.epochs, args.released_epochs)
    disp: dict[str, list[dict[str, Any]]] = {"reptile": [], "released": []}
    for e in range(epochs_tab):
        row = f"{e + 1:>6}"
        for v in args.variants:
            recs = [
                r["methods"][v]["epochs"][e] for r in runs if e < len(r["methods"][v]["epochs"])
            ]
            if not recs or recs[0]["displacement"] is None:
                row += f"{'':>22}{'':>18}"
                continue
            d = statistics.fmean(x["displacement"]["total"] for x in recs)
            s = statistics.fmean(x["step"]["total"] for x in recs)
            disp[v].append(
                {
                    "epoch": e + 1,
                    "displacement": d,
                    "step": s,
                    "by_group": {
                        g: statistics.fmean(x["displacement"][g] for x in recs)
                        for g in recs[0]["displacement"]
                        if g != "total"
                    },
                    "support_loss": statistics.fmean(x["support_loss"] for x in recs),
                    "query_loss": statistics.fmean(x["query_loss"] for x in recs),
                }
            )
            row += f"{d:>22.3e}{s:>18.3e}"
        print(row)
    secs = {v: _ms([r["methods"][v]["seconds"] for r in runs])[0] for v in args.variants}
    print(
        "\nseconds per run (mean): "
        + "".join(f"{v} {secs[v]:.0f}, " for v in args.variants)
        + f"synthesis {synth_s:.0f} s; total {total_s:.0f} s"
    )

    summary = {
        m: {
            k: dict(zip(("mean", "sd"), _ms(col(m, k)), strict=True))
            for k in ("srcc_mean_per_type", "krcc_mean_per_type", "srcc_pooled", "krcc_pooled")
        }
        for m in methods
    }
    per_type = {
        g: {m: {k: _ms(col(m, k, g))[0] for k in ("srcc", "krcc")} for m in methods}
        for g in type_ids
    }
    print(
        json.dumps(
            {
                "benchmark": "stage1_transfer",
                "date_utc": started.isoformat(timespec="seconds"),
                "backbone": args.backbone,
                "weights": args.pretrained,
                "vpt_tokens": runs[0]["vpt_tokens"],
                "data": desc,
                "pristine_size": args.size,
                "types": type_ids,
                "train_images": len(train_files),
                "heldout_images": len(held_files),
                "heldout_distorted": len(held),
                "epochs": {"reptile": args.epochs, "released": args.released_epochs},
                "seeds": args.seeds,
                "overrides": args.overrides,
                "configs": {v: runs[0]["methods"][v]["config"] for v in args.variants},
                "summary": summary,
                "gain_over_untrained": gains,
                "per_type": per_type,
                "probe_cv_srcc_pretraining": cv,
                "displacement_per_epoch": disp,
                "max_abs_displacement": {
                    v: [r["methods"][v]["max_abs_displacement"] for r in runs]
                    for v in args.variants
                },
                "seconds": {"synthesis": round(synth_s, 1), "total": round(total_s, 1), **secs},
                "torch_threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_average_before": load_before,
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "grmpiqa": grmpiqa.__version__,
                "per_seed": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
