"""Fixtures shared by the tests: one real local Ray per test module (isolated from the user's) and fault injection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HANG = 1800
"""Seconds after which a subprocess is taken to hang: a deadline stops a hang, it never decides a pass."""

# Ray reads this at import, and test modules import ray at collection, before any fixture runs:
# without it a driver connecting to a loopback ``Cluster`` hangs (docs/DESIGN.md section 5).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def hang() -> int:
    """:data:`HANG`, for tests that wait on Ray themselves."""
    return HANG


@pytest.fixture(scope="module")
def ray_env():
    """Isolate ``HOME`` and ``RAY_TMPDIR`` (Ray writes its auth token and sessions there) and keep Ray on loopback."""
    root = tempfile.mkdtemp(prefix="rayt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", root)
        mp.setenv("RAY_TMPDIR", root)
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_DEDUP_LOGS", "0")
        # A job started from a test must start its own Ray, not join one named by the environment.
        mp.delenv("RAY_ADDRESS", raising=False)
        yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local(ray_env):
    """A local Ray with 4 logical CPUs and one fake GPU (GPU scheduling is testable on CPU)."""
    import ray

    ray.init(num_cpus=4, num_gpus=1, _node_ip_address="127.0.0.1", include_dashboard=False)
    yield
    ray.shutdown()


def kill_busiest(backend) -> None:
    """Kill the replica actor with the most calls in flight (its death surfaces as ``RayActorError``)."""
    import ray

    ray.kill(backend.pool.slots[backend.pool.busiest()].handle, no_restart=True)


def _inject_fault(backend, after: int, action=None) -> None:
    """Once ``after`` results have been accepted in total, run ``action(backend)`` once (default:
    :func:`kill_busiest`), so faults land while shards are in flight. Listens to the scheduler's results."""
    fired: list[bool] = []

    def listener(accepted: int) -> None:
        if not fired and accepted >= after:
            fired.append(True)
            (action or kill_busiest)(backend)

    backend.scheduler.listeners.append(listener)


@pytest.fixture
def inject_fault():
    """:func:`_inject_fault`: ``inject_fault(backend, after=N, action=None)``."""
    return _inject_fault


class RecordingBackend:
    """A backend that forwards to ``inner``, checks every result answers its own task in task order, and
    keeps each run's ``(tasks, results)``; other attributes (``counters``, ``pool``, ...) are the inner's."""

    def __init__(self, inner):
        self.inner = inner
        self.runs: list[tuple[list, list]] = []

    def run(self, tasks):
        results = self.inner.run(tasks)
        assert [r.key for r in results] == [t.key for t in tasks]
        self.runs.append((tasks, results))
        return results

    @property
    def tasks(self) -> int:
        """Tasks run so far."""
        return sum(len(tasks) for tasks, _ in self.runs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def recorded():
    """A ``backend_factory`` for :class:`~flops_ray.training.trainer.Trainer` whose backends are :class:`RecordingBackend` s."""
    from flops_ray.training.trainer import default_backend

    return lambda cfg, model, loss_fn: RecordingBackend(default_backend(cfg, model, loss_fn))


def _check_outputs(out, steps: int) -> dict:
    """What every ``finetune_vit`` run leaves in ``out``; returns its summary.

    Quick runs train a few steps from scratch, too few to beat chance reliably, so the accuracy is
    checked for what it claims to be: the test accuracy of the checkpoint the run saved.
    """
    import json
    from pathlib import Path

    from flops_ray.app.run import evaluate
    from flops_ray.training.checkpoint import read_checkpoint
    from flops_ray.training.metrics_log import read_metrics

    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["config"]["steps"] == steps
    assert summary["queries"] > 0 and summary["wall_seconds"] > 0
    assert summary["final_test_accuracy"] == evaluate(out / "checkpoint.safetensors")["test_accuracy"]
    table = read_metrics(out / "metrics.parquet")
    assert table.column("step").to_pylist() == list(range(steps))
    assert all(len(v) == summary["config"]["batch_size"] for v in table.column("sample_loss").to_pylist())
    assert read_checkpoint(out / "checkpoint.safetensors").step == steps
    for png in ("curves.png", "allocation.png", "trace_vs_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    return summary


@pytest.fixture
def check_outputs():
    """:func:`_check_outputs`: ``check_outputs(out_dir, steps) -> summary``."""
    return _check_outputs


def _run_script(*args: str, cwd: Path = ROOT, ok: bool = True) -> subprocess.CompletedProcess:
    """Run ``python *args`` in a fresh interpreter; with ``ok``, fail showing its output unless it exits 0."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=HANG, check=False)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="session")
def run_script():
    """:func:`_run_script`: ``run_script("jobs/x.py", "--quick", ok=True) -> CompletedProcess``."""
    return _run_script


@pytest.fixture(scope="session")
def digits_splits():
    """The built-in digits data: ``(train, test)``."""
    from flops_ray.data.arrays import digits

    return digits("train"), digits("test")


# ---- tiny causal LMs ------------------------------------------------------------------------------------
TINY_LM_WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "plus", "is", "?", *(str(i) for i in range(40))]
"""The tiny LMs' word-level vocabulary: sums written out ("3 plus 4 is" -> "7")."""


def _tiny_tokenizer(transformers, bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_LM_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:  # Llama's tokenizers start every prompt with <bos>
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def _tiny_lm(transformers, kind: str):
    import torch

    torch.manual_seed(0)
    special = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=2, **special)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        **special,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_lm_dirs(tmp_path_factory) -> dict[str, str]:
    """``kind -> directory`` of a saved tiny LM (``gpt2``, ``llama``) and its word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    out = {}
    for kind in ("gpt2", "llama"):
        path = tmp_path_factory.mktemp(kind)
        _tiny_lm(transformers, kind).save_pretrained(path)
        _tiny_tokenizer(transformers, bos=kind == "llama").save_pretrained(path)
        out[kind] = str(path)
    return out
