"""The ``dqdeploy`` command line: quantize -> export -> check / lint -> sample / eval.

Typical use::

    dqdeploy quantize MODEL_DIR --recipe w8a8 --out q/ && dqdeploy export q/ --target trt --out e/

This module holds the click group and the console entry point :func:`main`; each verb lives in a module of its
own name (``eval`` in :mod:`.eval`), shared option groups and parameter types in :mod:`.params`.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from ..core.errors import as_user_error
from ..system.interrupts import Terminated, install_signal_handlers
from ..system.launch import local_peer, under_launcher
from .analyze import analyze
from .check import check
from .eval import eval_cmd
from .export import export
from .inspect import inspect
from .lint import lint
from .lora import lora
from .prompts import encode_prompts
from .quantize import quantize
from .sample import sample
from .serve import serve

__all__ = ["cli", "main"]


def _setup(verbose: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone shows progress
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dqdeploy.progress").setLevel(logging.INFO)  # progress of long loops, shown without -v too
    for noisy in ("diffusers", "torch.onnx", "onnxscript", "onnx_ir"):  # onnx_ir logs every initializer it deduplicates
        logging.getLogger(noisy).setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="dqdeploy")
def cli(verbose: bool) -> None:
    """Ship low-bit diffusion denoisers (UNets and diffusion transformers) with DilateQuant.

    \b
    1. dqdeploy quantize MODEL_DIR --recipe w8a8 --out Q     # Weight Dilation + per-step scales + BKD
    2. dqdeploy export Q --target ort --out E                 # ort-layout int8 QDQ ONNX (ONNX Runtime, CPU)
       dqdeploy export Q --target onnx --out E                # trt-layout int8 QDQ ONNX
       dqdeploy export Q --target trt --out E                 # trt-layout ONNX in FP16 + TensorRT engine (GPU)
    3. dqdeploy check Q E                                     # simulation vs exported graph
    4. dqdeploy sample E --n 64 --out grid.png                # images through the deployed graph
       dqdeploy lora Q style.safetensors --out Q2              # a LoRA folded in, no re-quantizing
    5. dqdeploy serve E --port 8000                           # HTTP: POST /generate -> PNG, batched

    \b
    Words: a layout (trt | ort) is the int8 graph's conventions, i.e. the runtime it is shaped for;
    a target (onnx | trt | ort | float) is what export writes: a layout, a precision, an engine or not;
    a runtime (ort | trt) is what runs an export: ONNX Runtime runs both layouts, TensorRT the trt layout.
    """
    _setup(verbose)


for _command in (quantize, inspect, sample, eval_cmd, export, check, analyze, lint, lora, encode_prompts, serve):
    cli.add_command(_command)


def _interrupted() -> None:
    if not under_launcher():
        click.echo("interrupted: no output was left behind", err=True)
    # A KeyboardInterrupt that surfaced inside a string exec (dataclasses, lazy imports) leaves
    # CPython's "unhandled KeyboardInterrupt" flag set, and `python -m` then dies by SIGINT instead
    # of exiting 130; a string exec resets that flag.
    exec("None")
    sys.exit(130)


def main() -> None:
    """Console entry point: user errors (a full disk included) print one message and exit non-zero, without a
    traceback. SIGINT exits 130 and SIGTERM 143, both after temporary folders are removed."""
    install_signal_handlers()
    try:
        cli.main(standalone_mode=False)
    except Terminated:
        if not under_launcher():  # under --nproc the launcher says it, once
            click.echo("terminated: no output was left behind", err=True)
        sys.exit(143)
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt
        _interrupted()
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:
        if (error := as_user_error(exc)) is None:
            raise  # a bug: its traceback is the report
        # under --nproc every rank has the error (distributed.agree) on one terminal: rank 0 says it
        if not local_peer():
            click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
