"""The conformance suite on Hugging Face transformers' Switch and Mixtral code (skipped
without torch and transformers): which conventions they follow, and where they differ.

The findings are the HF column of docs/testing_your_moe.md; this test re-derives them from
the installed release, so a change in transformers shows up here."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tinymoe.conformance import detect_conventions, run  # noqa: E402
from tinymoe.conformance.hf_adapters import HFMixtral, HFSwitch  # noqa: E402

pytestmark = pytest.mark.torch


def failures(adapter):
    return {key: msg for key, msg in run(adapter).items()
            if msg is not None and not msg.startswith("skipped")}


def test_hf_switch_conventions_and_differences():
    adapter = HFSwitch()
    found = detect_conventions(adapter)
    assert found == {"tie_breaking": ["lowest_index", "any"],  # torch.argmax: first maximum
                     "router_precision": ["input"],  # probs cast back to the input dtype
                     "priority": ["choice_major", "token_major"],  # top-1: the same thing
                     "dropped_tokens": ["zero"],  # the residual is added outside the MLP
                     "aux_pooling": ["pooled"]}, found  # layers concatenated, one loss
    bad = failures(adapter)
    assert set(bad) == {("switch_aux_loss", "no_tokens"), ("z_loss", "no_tokens")}, bad
    assert all("got nan" in msg for msg in bad.values())  # 0/0 on an empty batch
    skipped = [k for k, v in run(adapter).items() if v and v.startswith("skipped")]
    assert all(c == "capacity_positions" and k != "one_expert" for c, k in skipped)


def test_hf_mixtral_conventions_and_differences():
    adapter = HFMixtral()
    found = detect_conventions(adapter)
    assert found == {"tie_breaking": ["any"],  # torch.topk does not prefer the lowest index
                     "router_precision": ["float32", "input"],  # softmax in float32
                     "aux_pooling": ["pooled"],  # counts and probabilities over all layers
                     "mixtral_k_factor": [True]}, found  # uniform routing gives k
    bad = failures(adapter)
    assert set(bad) == {("mixtral_aux_loss", "no_tokens")}, bad
    assert "got nan" in bad["mixtral_aux_loss", "no_tokens"]
