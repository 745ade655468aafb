"""The audiovisual exit benchmark runs end to end on a few synthetic scenes (numbers and timings are not asserted:
one training epoch learns little, and timing is noisy)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from bench import multimodal


def test_multimodal_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert multimodal.main(["--quick", "--scenes", "120", "--checkpoints", "", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    lights = result["lighting_names"]
    assert lights == ["bright", "dim", "dark"]
    assert result["train_samples"] + result["val_samples"] + result["test_samples"] == 120

    exits = {r["exit"]: r for r in result["exits"]}
    assert set(exits) == {"slvit@0:audio", "slvit@2", "slvit@2:fused", "slvit@4", "slvit@4:fused", "final"}
    for r in exits.values():
        assert math.isfinite(r["mae"]) and r["mae"] >= 0
        assert set(r["mae_by_lighting"]) == set(lights) and set(r["std_by_lighting"]) == set(lights)
        assert all(v is None or math.isfinite(v) for v in r["mae_by_lighting"].values())
        assert r["params"] > 0 and r["macs"] > 0 and r["macs_standalone"] >= r["macs"]
    # the audio-only exit needs no visual block; a fused exit needs both inputs
    assert exits["slvit@0:audio"]["macs_standalone"] < exits["slvit@2"]["macs_standalone"]
    assert exits["slvit@2:fused"]["macs_standalone"] > exits["slvit@2"]["macs_standalone"]

    visual_model = {r["exit"]: r for r in result["visual_model"]["exits"]}
    assert set(visual_model) == {"slvit@2", "slvit@4", "final"}
    assert all(set(r["mae_by_lighting"]) == set(lights) for r in visual_model.values())
    assert all(math.isfinite(r["mae_train"]) and r["std"] > 0 for r in [*exits.values(), *visual_model.values()])
    assert result["visual_model"]["costs"]["audio_encoder"] == 0

    for name in ("ladder", "visual", "visual-model"):
        policy = result["policies"][name]
        points, latency = policy["points"], policy["latency"]
        assert len(points) == len(latency) >= 3
        assert points[0]["threshold"] == 0.0 and points[0]["shares"]["final"] == 1.0  # everything offloaded
        assert points[-1]["threshold"] == "inf" and points[-1]["shares"]["final"] == 0.0  # nothing offloaded
        for p, q in zip(points, latency):
            assert math.isfinite(p["mae"]) and p["macs"] > 0 and p["macs_lazy_audio"] <= p["macs"]
            assert math.isclose(sum(p["shares"].values()), 1.0, abs_tol=1e-9)
            assert q["ms_per_sample"] > 0
            # the simulated walk and the real EdgeHalf + CloudHalf agree on the answers
            assert math.isclose(p["mae"], q["mae_measured"], rel_tol=1e-3, abs_tol=1e-3)
        # with everything offloaded a policy answers with its model's final head
        final = (visual_model if policy["model"] == "visual" else exits)["final"]["mae"]
        assert math.isclose(points[0]["mae"], final, rel_tol=1e-6)
    # the ladder's first exit is audio-only: answering everything there costs no visual block
    walk = result["policies"]["ladder"]["walk_macs"]["eager"]
    assert walk[0] == result["costs"]["audio_encoder"] + exits["slvit@0:audio"]["macs"]

    assert len(result["comparison"]["strict"]) == len(result["policies"]["visual"]["points"])
    verdict = result["verdict"]
    assert isinstance(verdict["fused_beats_visual_in_dark"]["met"], bool)
    assert [r["position"] for r in verdict["fused_beats_visual_in_dark"]["positions"]] == [2, 4]
    assert isinstance(verdict["ladder_cheaper_at_same_mae"]["met"], bool)
    assert set(verdict["ladder_cheaper_at_same_mae"]["against_visual_model"]) == {"macs", "latency"}
