"""What a teacher training run writes for people: the loss curve and the folder's README."""

from __future__ import annotations

from pathlib import Path

from student.perspective_teacher.data import VAL_SEED_BASE

def plot_curve(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = history["loss"]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if loss:
        ax.plot(range(1, len(loss) + 1), loss, color="tab:blue", alpha=0.2, lw=0.6)
        k = max(1, len(loss) // 50)
        sm = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(range(1, len(loss) + 1), sm, color="tab:blue", label=f"train (mean of {k} steps)")
    if history["val"]:
        s, v = zip(*history["val"])
        ax.plot(s, v, "o-", color="tab:orange", ms=3, label="held-out views")
    ax.set_xlabel("step")
    ax.set_ylabel("affine-invariant loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- output

def _fmt(m: dict) -> str:
    return f"AbsRel {m['abs_rel']:.4f}  delta1 {m['delta1']:.4f}  RMSE {m['rmse']:.3f}  loss {m['loss']:.4f}"


ARCH_NOTES = {
    "dpt_hybrid": "DPT-Hybrid (`DPTForDepthEstimation`, `is_hybrid=True`): a small BiT ResNet encoder to stride 16, "
                  "a 4-layer ViT on its feature map, and DPT's fusion decoder",
    "glpn": "GLPN (`GLPNForDepthEstimation`): a SegFormer/MiT hierarchical encoder and GLPN's light decoder",
    "depth_anything": "Depth Anything (`DepthAnythingForDepthEstimation`): a small DINOv2 ViT (patch 14) and the "
                      "DPT head",
    "dpt": "DPT (`DPTForDepthEstimation`): a small ViT (patch 16) and DPT's fusion decoder",
}


def write_readme(out: Path, info: dict) -> None:
    v, b = info["val"], info["baselines"]
    rows = [f"| this model | {v['abs_rel']:.4f} | {v['delta1']:.4f} | {v['rmse']:.3f} | {v['loss']:.4f} |"]
    for name, m in b.items():
        rows.append(f"| baseline: {name.replace('_', ' ')} | {m['abs_rel']:.4f} | {m['delta1']:.4f} | "
                    f"{m['rmse']:.3f} | {m['loss']:.4f} |")
    t = info["train"]
    init_note = f" Initialised from `{info['init']}`." if info.get("init") else ""
    if t["clock"] == "process":
        budget = (f"the training loop ran for {t['train_s'] / 60:.1f} min of CPU time on {t['threads']} thread(s) "
                  f"(`--clock process`); the whole command took {t['wall_s'] / 60:.1f} min of wall time on a "
                  f"machine shared with other jobs")
    else:
        budget = (f"wall time {t['wall_s'] / 60:.1f} min for the whole command ({t['train_s'] / 60:.1f} min of "
                  f"training) on {t['threads']} CPU thread(s)")
    resample_note = (f"; for {t['resample']:.0%} of the views the RGB was halved and resized back (`--resample`: "
                     "the blur of a cube face rendered at half the input size)") if t.get("resample") else ""
    text = f"""# {out.name}: a small perspective depth teacher for generated scenes

A small depth network trained {'further' if info.get('init') else 'from scratch'} that predicts **relative disparity** (larger = closer) of a
perspective view: {ARCH_NOTES[info['arch']]}; {info['params']:,} parameters. It stands in for Depth Anything in
pano-distill's demonstrations, where the real foundation model cannot be downloaded. It was trained only
on generated rooms (`sharding.synthetic`), so it is meant for **generated scenes and demos, not real
photographs**.

Load it like any other teacher:

```python
from transformers import AutoModelForDepthEstimation
model = AutoModelForDepthEstimation.from_pretrained("{out.name if out.is_absolute() else out.as_posix()}")
disparity = model(pixel_values=x).predicted_depth  # (B, h, w), relative disparity
```

`x` is RGB in [0, 1], resized to {info['input_size']} x {info['input_size']} and normalised with the ImageNet
mean/std of `preprocessor_config.json`. Input size: {info['input_size']} px (`pano_distill.json`).

## Training

```
{info['command']}
```

{info['trained_on']}.{init_note} Adam (lr {t['lr']}, warm-up then cosine decay), batch {t['batch_size']}, the
affine-invariant loss (`panorama.depth_math.affine_invariant_loss`) against `normalize_disparity(1 / depth)`
over valid pixels, random horizontal flips and photometric augmentation (channel permutation, grayscale,
saturation, gains, brightness, contrast, gamma, noise){resample_note}. {t['steps']} steps; {budget}.

## Validation

{info['val_views']} held-out generated views (scenes {VAL_SEED_BASE}+, disjoint from training), depth
metrics under the reference code's lstsq protocol (`panorama.depth_math`: least-squares scale and shift of
disparity, median scaling, clamp to [0.1, 10] m; 0 < depth <= 10 m, sky excluded):

| predictor | AbsRel | delta1 | RMSE (m) | affine-inv. loss |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

`loss_curve.png` shows the training and held-out loss; `metrics.jsonl` the logged steps.
"""
    (out / "README.md").write_text(text)
