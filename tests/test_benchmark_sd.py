"""scripts/benchmark_sd.py's flow families: the SD3.5-medium and FLUX.1-dev shapes it builds for a GPU, counted on
the meta device (nothing allocated) against the published sizes, and the whole benchmark, the path a GPU user runs
at 1024 px, at ``--scale tiny`` on the CPU: its CSVs hold one row per attack, size and run, the attacks are those
the family takes (FLUX.1: no CLiD), seconds and peak memory are positive, each attack's counted transformer
evaluations per image equal the registry's cost formula, and the model folder is the family's pipeline in
bfloat16 safetensors. (The sd15 family is ``make benchmark-sd``'s 4 GB build, not run here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mialib.attacks import REGISTRY
from mialib.settings import Settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "benchmark_sd.py"
# sd15's five attacks and the noise-level curve; FLUX.1 has no trained unconditional branch, so no CLiD
ATTACKS = {
    "sd3": ["structural", "loss", "pia", "secmi", "clid", "curve"],
    "flux": ["structural", "loss", "pia", "secmi", "curve"],
}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_sd", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_scale_components_have_the_published_sizes():
    """``--scale real`` built on the meta device: SD3.5-medium's transformer 2.243 B parameters plus its stored
    0.226 B position table (2.47 B, the published "2.5 B"), FLUX.1-dev's 11.90 B, T5-XXL's encoder 4.762 B,
    CLIP-L 123.1 M (123.7 M with SD3's projection), bigG 694.7 M with projection; the 16-channel VAEs 83.8 M."""
    script = _script()
    sd3, flux = script.flow_components("sd3"), script.flow_components("flux")
    modules = [m for c in (sd3, flux) for m in c.values() if isinstance(m, torch.nn.Module)]
    assert all(p.device.type == "meta" for m in modules for p in m.parameters())  # nothing was allocated

    def billions(module):
        return sum(script.weight_counts(module)) / 1e9

    assert billions(sd3["transformer"]) == pytest.approx(2.5, rel=0.02)
    assert script.weight_counts(sd3["transformer"])[1] == 384 * 384 * 1536  # pos_embed_max_size 384, width 1536
    assert billions(flux["transformer"]) == pytest.approx(11.9, rel=0.01)
    assert billions(sd3["text_encoder_3"]) == billions(flux["text_encoder_2"]) == pytest.approx(4.76, rel=0.01)
    assert billions(flux["text_encoder"]) == pytest.approx(0.123, rel=0.01)
    assert billions(sd3["text_encoder"]) == pytest.approx(0.1237, rel=0.01)
    assert billions(sd3["text_encoder_2"]) == pytest.approx(0.695, rel=0.01)
    assert billions(sd3["vae"]) == billions(flux["vae"]) == pytest.approx(0.0838, rel=0.01)
    t5 = sd3["text_encoder_3"]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied, as from_pretrained ties them
    config = sd3["transformer"].config
    assert list(config.dual_attention_layers) == list(range(13)) and config.qk_norm == "rms_norm"
    assert config.num_layers == config.num_attention_heads == 24 and config.caption_projection_dim == 24 * 64
    assert flux["transformer"].config.guidance_embeds and tuple(flux["transformer"].config.axes_dims_rope) == (
        16,
        56,
        56,
    )
    assert (sd3["vae"].config.scaling_factor, sd3["vae"].config.shift_factor) == (1.5305, 0.0609)
    assert (flux["vae"].config.scaling_factor, flux["vae"].config.shift_factor) == (0.3611, 0.1159)
    assert flux["scheduler"].config.use_dynamic_shifting and sd3["scheduler"].config.shift == 3.0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_flow_benchmark_at_tiny_scale_writes_every_attack_with_its_cost(tmp_path, family):
    # 4 images: mialib scores a set with a member and a non-member in calibration and in test
    argv = [sys.executable, str(SCRIPT), "--family", family, "--scale", "tiny", "--images", "4", "--sizes", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([*argv, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    tag = f"{family}_tiny"
    assert (tmp_path / f"{tag}_cost.png").stat().st_size > 0

    loads = pd.read_csv(tmp_path / f"{tag}_load.csv")
    assert list(loads["dtype"]) == ["bfloat16"]  # the flow families' load probe: bfloat16 only
    assert (loads[["load_s", "weights_mb", "rss_after_load_mb", "peak_rss_mb"]] > 0).all(axis=None)

    scores = pd.read_csv(tmp_path / f"{tag}_score_bfloat16.csv")
    assert len(scores) == len(ATTACKS[family]) * 2  # one size, a cold and a warm run
    for (size, run), group in scores.groupby(["size", "run"]):
        assert size == 64 and run in ("cold", "warm") and list(group["attack"]) == ATTACKS[family]
    assert set(scores["dtype"]) == {"bfloat16"} and set(scores["images"]) == {4}
    assert (scores[["seconds_per_image", "peak_memory_mb", "wall_s"]] > 0).all(axis=None)
    for row in scores.itertuples():
        spec = REGISTRY[row.attack]
        # the formula, and what the cold run counted (the warm run reads the cold run's rows back)
        assert row.unet_evals == row.unet_evals_run == spec.cost(spec.params(), Settings()) > 0, row.attack

    model = tmp_path / f"{tag}-random"
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == PIPELINES[family]
    from safetensors import safe_open

    files = sorted(model.rglob("*.safetensors"))
    assert {f.parent.name for f in files} >= {"transformer", "vae", "text_encoder", "text_encoder_2"}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"BF16"}, file
