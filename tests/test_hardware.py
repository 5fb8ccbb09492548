"""Hardware-aware defaults: one decision for precision "auto", threads and num_proc, on faked machines."""

import json
import random
import sys

import pytest
import torch
from transformers import AutoTokenizer

from distill.common import hardware
from distill.data import corpus as data
from distill.settings.config import make_config
from distill.train.loop import train
from distill.train.precision import Precision
from tests import tiny

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
SAPPHIRE = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


# --------------------------------------------------------------------------- the decision function


@pytest.mark.parametrize("device, flags, cuda_bf16, expect", [
    ("cpu", AVX2_ONLY, None, ("fp32", None)),
    ("cpu", AVX2_ONLY | {"avx512f"}, None, ("fp32", None)),  # AVX-512 without its bf16 extension: emulated
    ("cpu", AVX2_ONLY | {"avx512_bf16"}, None, ("bf16", None)),
    ("cpu", AVX2_ONLY | {"amx_bf16"}, None, ("bf16", None)),
    ("cpu", SAPPHIRE, None, ("bf16", None)),
    ("cpu", None, None, ("fp32", None)),  # flags unreadable: never guess the slow mode
    ("cpu", frozenset({"asimd", "bf16"}), None, ("fp32", None)),  # ARM's bf16 flag is not oneDNN's x86 kernels
    ("cuda", None, True, ("bf16", None)),
    ("cuda", AVX2_ONLY, False, ("fp16", "O2")),  # pre-Ampere: fp16 O2; the host CPU does not matter
    ("mps", SAPPHIRE, None, ("fp32", None)),
])
def test_auto_precision_follows_the_hardware(device, flags, cuda_bf16, expect):
    precision, level, why = hardware.resolve_auto_precision(device, flags, cuda_bf16)
    assert (precision, level) == expect
    assert why and "\n" not in why


def test_the_reason_names_what_was_missing_or_found():
    assert hardware.resolve_auto_precision("cpu", AVX2_ONLY, None)[2] == (
        "this CPU has no avx512_bf16/amx_bf16; bf16 would be emulated")
    assert "amx_bf16" in hardware.resolve_auto_precision("cpu", AVX2_ONLY | {"amx_bf16"}, None)[2]
    assert "could not read" in hardware.resolve_auto_precision("cpu", None, None)[2]
    assert "pre-Ampere" in hardware.resolve_auto_precision("cuda", None, False)[2]


def test_precision_auto_builds_the_chosen_mode_and_says_why():
    prec = Precision.from_config("auto", device="cpu", cpu_flags=AVX2_ONLY)
    assert prec.mode == "fp32" and prec.autocast().__class__.__name__ == "nullcontext"
    assert prec.auto_reason == "precision: auto -> fp32 (this CPU has no avx512_bf16/amx_bf16; bf16 would be emulated)"
    prec = Precision.from_config("auto", device="cpu", cpu_flags=SAPPHIRE)
    assert prec.mode == "bf16" and prec.notes == [] and prec.auto_reason.startswith("precision: auto -> bf16 (")
    with prec.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_explicit_choices_stand_with_their_warnings():
    prec = Precision.from_config("bf16", device="cpu", cpu_flags=AVX2_ONLY)
    assert prec.mode == "bf16" and prec.auto_reason is None
    assert any("slower than fp32" in n for n in prec.notes)
    assert Precision.from_config("fp32", device="cpu", cpu_flags=SAPPHIRE).mode == "fp32"
    # explicit fp16 on a GPU recipe passes through untouched (O2 as the recipe says)
    assert hardware.choose_precision("fp16", "O2", "cuda") == ("fp16", "O2", None)
    assert hardware.choose_precision("fp16", "O1", "cuda") == ("fp16", "O1", None)


@pytest.mark.parametrize("bf16_supported, mode", [(True, "bf16"), (False, "fp16 O2")])
def test_auto_on_a_faked_gpu_asks_torch_cuda(monkeypatch, bf16_supported, mode):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    precision, level, line = hardware.choose_precision("auto", "O1", "cuda")
    assert (f"fp16 {level}" if precision == "fp16" else precision) == mode
    assert line.startswith(f"precision: auto -> {mode} (")


# --------------------------------------------------------------------------- reading the machine


def test_cpu_flags_and_model_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Example CPU 9000 @ 2.0GHz\nflags\t\t: fpu avx2 amx_bf16\n\n"
                   "processor\t: 1\nmodel name\t: Example CPU 9000 @ 2.0GHz\nflags\t\t: fpu avx2 amx_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n\nModel\t: Example Board\n")
    assert hardware.read_cpu_flags(str(x86)) == frozenset({"fpu", "avx2", "amx_bf16"})
    assert hardware.read_cpu_model(str(x86)) == "Example CPU 9000 @ 2.0GHz"
    assert hardware.read_cpu_flags(str(arm)) == frozenset({"fp", "asimd", "bf16"})
    assert hardware.read_cpu_model(str(arm)) == "Example Board"
    assert hardware.read_cpu_flags(str(tmp_path / "missing")) is None
    from distill.train.precision import (
        read_cpu_flags,  # the old import path still works
    )

    assert read_cpu_flags is hardware.read_cpu_flags


@pytest.mark.parametrize("omp, expect", [(None, 6), ("2", 2), ("16", 6), ("3,1", 3), ("junk", 6), ("0", 6)])
def test_usable_cores_are_the_affinity_mask_capped_by_omp_num_threads(monkeypatch, omp, expect):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 2, 3, 5, 6, 7}, raising=False)
    env = {} if omp is None else {"OMP_NUM_THREADS": omp}
    assert hardware.usable_cores(env) == expect


def test_threads_auto_uses_the_usable_cores_shared_by_local_processes(monkeypatch):
    assert hardware.resolve_threads("auto", cores=8) == (8, "auto: 8 usable cores (CPU affinity mask)")
    assert hardware.resolve_threads("auto", cores=8, processes=3)[0] == 2
    assert hardware.resolve_threads("auto", cores=2, processes=4)[0] == 1
    assert hardware.resolve_threads(3, cores=8) == (3, "set by threads")
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    threads, why = hardware.resolve_threads("auto")
    assert threads == 4 and "OMP_NUM_THREADS" in why


def test_num_proc_auto_keeps_small_corpora_in_process():
    small, big = hardware.IN_PROCESS_ROWS - 1, hardware.IN_PROCESS_ROWS
    assert hardware.resolve_num_proc("auto", num_rows=small, cores=8) == 1
    assert hardware.resolve_num_proc("auto", num_rows=big, cores=8) == 8
    assert hardware.resolve_num_proc("auto", num_bytes=hardware.IN_PROCESS_BYTES, cores=4) == 4
    assert hardware.resolve_num_proc("auto", num_bytes=1000, cores=4) == 1
    assert hardware.resolve_num_proc("auto", cores=4) == 1  # size unknown: no processes on a guess
    assert hardware.resolve_num_proc(3, num_rows=10, cores=8) == 3


def test_machine_description_is_what_the_readers_return(monkeypatch):
    monkeypatch.setattr(hardware, "read_cpu_model", lambda: "Example CPU 9000")
    monkeypatch.setattr(hardware, "read_cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(hardware, "read_gpus", lambda: [])
    info = hardware.machine_description()
    assert info["cpu"] == "Example CPU 9000" and info["cpu_flags"] == ["avx2"] and info["cpu_bf16"] == []
    assert info["usable_cores"] == 2 and info["logical_cpus"] == 4
    line = hardware.describe_machine(info)
    assert line.startswith("Example CPU 9000 (") and "avx2" in line and "2 usable cores of 4" in line
    assert line.endswith("no GPU")
    gpu = {"name": "Example GPU", "memory_gib": 80.0, "capability": "9.0"}
    assert hardware.describe_machine({**info, "gpus": [gpu, gpu]}).endswith("; 2 x Example GPU (80 GiB)")


# --------------------------------------------------------------------------- corpus preparation on the cores


def _lines(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(tiny.WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_threaded_tokenisation_gives_the_same_ids_in_the_same_order(vocab_dir):
    backend = data._backend(AutoTokenizer.from_pretrained(vocab_dir))
    texts = _lines(257)
    expect = [backend.encode(t, add_special_tokens=False).ids for t in texts]  # one at a time, no batching
    for threads in (1, 2, 3, 8):
        assert data._tokenize_batch(texts, backend, threads)["ids"] == expect


def test_num_proc_auto_and_explicit_processes_build_the_same_blocks(tmp_path, vocab_dir):
    tok = AutoTokenizer.from_pretrained(vocab_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_lines(400, seed=1)) + "\n")
    auto = data.load_corpus_blocks(str(corpus), tok, 16, tmp_path / "auto")
    two = data.load_corpus_blocks(str(corpus), tok, 16, tmp_path / "two", num_proc=2)
    assert auto["input_ids"][:] == two["input_ids"][:] and len(auto) > 50
    meta = json.loads(next((tmp_path / "auto").glob("tokens-*/meta.json")).read_text())
    assert meta["num_proc"] == 1  # 400 rows: in this process
    stream = [i for line in _lines(400, seed=1)
              for i in tok.encode(line, add_special_tokens=False) + [tok.sep_token_id]]  # a paragraph ends in [SEP]
    packed = [t for row in auto["input_ids"] for t in row[1:-1]]
    assert packed == stream[: len(packed)]


# --------------------------------------------------------------------------- a run records what auto became


def test_a_run_prints_and_records_the_resolved_precision_and_threads(bert_mlm_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_lines(200)) + "\n")
    out = tmp_path / "run"
    cfg = make_config(dict(teacher=bert_mlm_dir, corpus=str(corpus), output_dir=str(out),
                           cache_dir=str(tmp_path / "cache"), student_layers=[1, 3], weights={"cos": 1.0},
                           block_size=16, per_device_batch_size=4, max_steps=2, save_steps=0, progress=False,
                           device="cpu", threads=1))
    assert cfg.precision == "auto" and cfg.num_proc == "auto"
    before = torch.get_num_threads()
    try:
        train(cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    expect, _, why = hardware.resolve_auto_precision("cpu", hardware.read_cpu_flags(), None)
    err = capsys.readouterr().err
    assert f"precision: auto -> {expect} ({why})" in err.splitlines()
    assert "threads: 1 (set by threads)" in err.splitlines()
    assert any(line.startswith("allocator: ") for line in err.splitlines())
    record = json.loads((out / "distill_config.json").read_text())
    assert record["precision"] == "auto" and record["threads"] == 1
    resolved = record["_resolved"]
    assert resolved["precision"] == expect and resolved["threads"] == 1
    assert resolved["machine"]["cpu"] == hardware.read_cpu_model()
    assert make_config({k: v for k, v in record.items() if not k.startswith("_")}) == cfg  # still a recipe
    card = (out / "README.md").read_text()
    assert f"auto -> {expect} ({why})" in card
    assert hardware.describe_machine() in card


# --------------------------------------------------------------------------- glue-eval --precision


def _glue(monkeypatch, argv, use_cpu=True):
    from glue_eval.cli import _parse
    from glue_eval.arguments import apply_precision

    glue, args = _parse(argv + ["--model", "m", "--output_dir", "o"] + (["--use_cpu"] if use_cpu else []))
    return apply_precision(glue, args)


@pytest.mark.parametrize("flags, bf16", [(AVX2_ONLY, False), (SAPPHIRE, True)])
def test_glue_eval_auto_sets_trainer_bf16_only_where_the_cpu_has_it(monkeypatch, flags, bf16):
    monkeypatch.setattr(hardware, "read_cpu_flags", lambda *a: flags)
    args, line = _glue(monkeypatch, [])
    assert args.bf16 is bf16 and args.fp16 is False
    assert line.startswith(f"precision: auto -> {'bf16' if bf16 else 'fp32'} (")
    if bf16:
        assert str(getattr(args, "mixed_precision", "bf16")) == "bf16"  # Trainer's derived setting followed


@pytest.mark.parametrize("argv", [[], ["--precision", "bf16"]])
def test_glue_eval_bf16_on_a_cpu_needs_no_use_cpu_flag(monkeypatch, argv):
    # Trainer refuses bf16 on a CPU unless use_cpu is set: the CPU's own choice must not crash on that
    monkeypatch.setattr(hardware, "read_cpu_flags", lambda *a: SAPPHIRE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args, _ = _glue(monkeypatch, argv, use_cpu=False)
    assert args.bf16 and args.use_cpu


def test_glue_eval_explicit_precision_and_trainer_flags(monkeypatch):
    from distill.common.errors import UsageError

    monkeypatch.setattr(hardware, "read_cpu_flags", lambda *a: AVX2_ONLY)
    args, line = _glue(monkeypatch, ["--precision", "bf16"])
    assert args.bf16 and line is None  # explicit bf16 stands on a CPU without bf16 instructions
    args, line = _glue(monkeypatch, ["--precision", "fp32"])
    assert not args.bf16 and not args.fp16 and line is None
    args, line = _glue(monkeypatch, ["--bf16"])  # Trainer's own flag still works, auto steps aside
    assert args.bf16 and line is None
    with pytest.raises(UsageError, match="--precision fp32 disagrees with Trainer's --bf16"):
        _glue(monkeypatch, ["--precision", "fp32", "--bf16"])


MALLINFO_PROBE = r"""
import ctypes, json, sys
from distill.common.hardware import tune_malloc

libc = ctypes.CDLL("libc.so.6")
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p

def mmapped_by(size):
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    grew = libc.mallinfo2().hblkhd - before
    libc.free(ctypes.c_void_p(block))
    return grew

fresh = mmapped_by(4 << 20)
line = tune_malloc() if sys.argv[1] == "tune" else None
print(json.dumps({"fresh": fresh, "after": mmapped_by(16 << 20), "line": line}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_malloc_tuning_keeps_a_training_sized_block_off_mmap():
    """distill-train's --malloc_tuning (tune_malloc): in a fresh process glibc serves a 4 MiB block by mmap (and
    returns it to the kernel on free); tuned, a 16 MiB block comes from the heap and stays with the process."""
    import subprocess

    runs = {}
    for mode in ("tune", "keep"):
        done = subprocess.run([sys.executable, "-c", MALLINFO_PROBE, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[mode] = json.loads(done.stdout)
    assert runs["tune"]["fresh"] >= 4 << 20 and runs["keep"]["fresh"] >= 4 << 20  # glibc's default: mmap
    assert runs["tune"]["after"] == 0 and "--malloc_tuning false" in runs["tune"]["line"]
    assert runs["keep"]["after"] >= 16 << 20  # untuned, a larger block still goes to mmap
