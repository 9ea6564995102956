"""``dynaslice export``: one subnet of a checkpoint as a plain PyTorch or ONNX model, a PSS budget
entry, or a gated checkpoint as an ONNX package.

- ``--arch A``: ``largest``, ``smallest``, a ratio ``x0.5``, ``routeN`` (a gated net's route), an
  inline JSON arch ``'{"s1": 16, ...}'`` or a JSON file holding one arch;
- ``--budget-macs X`` / ``--budget-ms X``: the most accurate subnet of a PSS run's budget table
  within the budget (chosen on the validation split; see ``dynaslice select``);
- ``--gated``: the whole DS-Net model (trunk + gate + routes) as an ONNX package directory, run
  by :class:`dynaslice.onnx_package.GatedOnnxRunner` (onnxruntime and numpy only);
- ``--budget-table``: a PSS run's whole budget table as an ONNX package directory (one graph
  per entry), run by :class:`dynaslice.onnx_package.BudgetOnnxRunner` with budget switching;
- ``--binary``: a ``dynaslice binarize`` run's network as a 1-bit package directory (packed sign
  bits, :mod:`dynaslice.binary.packed`), run by the CPU kernel of :mod:`dynaslice.binary.kernel`.

Every package and ``.onnx`` file also loads with :func:`dynaslice.serve.load`.

``--format hf``: a language-model run's subnet (``dynaslice train`` of an ``hf:`` model) as a
Hugging Face checkpoint directory, which ``transformers`` alone loads
(:func:`dynaslice.lm.export_hf`): ``--arch A``, or with ``--budget-ms X`` / ``--budget-macs X``
the entry of the run's budget table (``RUN/budget_table.json``, :mod:`dynaslice.lm.search`'s
format) with the lowest validation perplexity within the budget, among the slices uniform over
their layers. A slice whose layers differ in width or heads has no standard config: ``--arch``
naming one is refused in one line.

An existing ``--out`` is refused unless ``--force``; with it, a file is replaced, and a folder
only when it holds a dynaslice package and nothing else (a user's results beside a package are
never deleted). A package's ``--out`` is a folder: a name ending in ``.onnx`` is refused.

``--format torch`` (the default unless ``--out`` ends in ``.onnx``) writes ``torch.save`` of the
extracted subnet, a ``torch.fx.GraphModule`` of plain ``torch.nn`` modules. Loading it needs torch
only, not dynaslice: ``model = torch.load(path, weights_only=False).eval()`` (a pickle: load only
files you trust). ``--format onnx`` writes one ONNX file: input ``input [batch, C, H, W]``
(normalised like the training data), output ``logits``.

BatchNorm statistics are per width: with ``--arch``, export from a file recalibrated for the
subnet (``dynaslice recalibrate``, a run's ``recalibrated.safetensors``); the command says so
when the file was not recalibrated for it. With ``--budget-*`` the subnet gets the BN
statistics its budget entry was selected with (see :class:`dynaslice.budget.BudgetNet`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import runs
from ..archspec import parse_arch
from ..budget import BudgetNet
from ..counting import count_macs
from ..data import DatasetError
from ..gate import GatedSupernet
from ..lm import count_params, export_hf
from ..lm.export import subnet_config
from ..lm.serve import load_table
from ..lm.train import load_lm_run
from ..modelfile import load_model_file
from ..models.base import Supernet
from ..onnx_export import export_budget, export_gated, export_onnx
from ..onnx_package import pick_entry
from ..space import Arch
from ..torch_export import extract_subnet, save_torch_model
from ..train.config import from_dict
from ..train.data import load_split
from .common import (
    UserError,
    add_trust_factory,
    budget_source,
    load_run_model,
    parse_amount,
    parse_macs,
    refuse_existing,
    refuse_existing_package,
    trusted_data,
)


def write_subnet(net: Supernet, arch: Arch, out: Path, fmt: str) -> str:
    """Write subnet ``arch`` of ``net`` (evaluated as it is: eval mode, its BN statistics) to
    ``out`` as ``fmt`` (``"torch"`` or ``"onnx"``); returns how to load the file."""
    if out.is_dir():
        raise UserError(f"{out} is a directory; give a file name (.pt or .onnx)")
    if fmt == "onnx":
        export_onnx(net, arch, out)
        return "run it with dynaslice.serve.load, dynaslice.onnx_package.OnnxModel or any ONNX runtime"
    save_torch_model(extract_subnet(net, arch).eval(), out)
    return "load it with torch.load(PATH, weights_only=False), no dynaslice needed"


def _export(args: argparse.Namespace) -> int:
    ckpt, out = Path(args.ckpt), Path(args.out)
    if not ckpt.exists():
        raise UserError(f"checkpoint {ckpt} not found: pass a run directory, a checkpoint directory or a model file")
    if args.binary:
        return _export_binary(ckpt, out, args.force)
    if args.gated or args.budget_table:
        refuse_existing_package(out, "package", args.force)
        if args.gated:  # a gated converted network of the user's own factory needs --trust-factory
            return _export_gated(ckpt, out, args.data_dir, args.trust_factory)
        return _export_budget(ckpt, out, args.data_dir)
    if args.format == "hf":
        return _export_hf(ckpt, out, args)
    fmt = args.format or ("onnx" if out.suffix == ".onnx" else "torch")
    refuse_existing(out, "export", force=args.force)
    if args.arch is not None:
        net, meta, _, _ = load_run_model(str(ckpt), trust=args.trust_factory)
        arch = parse_arch(args.arch, net)
        how = f"--arch {args.arch}"
        recal = {Arch(a) for a in (meta.get("recalibrated") or {}).values()}
        if arch not in recal:
            print(
                f"note: {ckpt} was not recalibrated for this subnet; its BN statistics may be off "
                "(run dynaslice recalibrate CKPT --archs ... first)",
                file=sys.stderr,
            )
        net.eval()
    else:
        budget_net = BudgetNet.load(budget_source(ckpt)).eval()
        entry = budget_net.entry(args.budget_macs, args.budget_ms)
        net, arch = budget_net.net, budget_net.use(entry)  # the entry's own BN statistics
        how = f"budget bucket {entry.bucket:g} (val top-1 {entry.val_accuracy:.2f}%)"
    macs = count_macs(net, arch)
    load = write_subnet(net, arch, out, fmt)
    print(f"exported {arch.to_json()} ({macs / 1e6:.2f} MMACs, {how}) to {out}; {load}")
    return 0


def _export_hf(ckpt: Path, out: Path, args: argparse.Namespace) -> int:
    """A language-model run's subnet ``--arch`` as a Hugging Face checkpoint directory."""
    if args.arch is None and args.budget_ms is None and args.budget_macs is None:
        raise UserError("--format hf exports one subnet: name it with --arch, --budget-ms or --budget-macs")
    if args.force:
        raise UserError("--format hf writes a new directory and replaces none: remove it or choose another --out")
    net, _, _, file = load_lm_run(ckpt)
    if args.arch is not None:
        arch, how = parse_arch(args.arch, net), f"--arch {args.arch}"
    else:
        arch, how = _lm_budget_entry(net, ckpt if ckpt.is_dir() else file.parent, args.budget_macs, args.budget_ms)
    export_hf(net, net.space.validate(arch), out)
    print(
        f"exported {arch.to_json()} of {file} ({count_params(net, arch) / 1e6:.2f} M parameters, {how}) to "
        f"{out}/; load it with transformers.AutoModelForCausalLM.from_pretrained, no dynaslice needed"
    )
    return 0


def _lm_budget_entry(net: Any, run: Path, max_macs: float | None, max_ms: float | None) -> tuple[Arch, str]:
    """The arch of the lowest-perplexity entry of a language-model run's budget table within the
    budget, among the entries a Hugging Face config can hold (slices uniform over their layers):
    the table's Mix'n'Match entries are for serving, and picking one would only be refused."""
    path = run / runs.BUDGET_TABLE
    if not path.is_file():
        raise UserError(f"{run} has no budget table ({runs.BUDGET_TABLE}, written by dynaslice.lm.search): use --arch")
    entries = load_table(path)  # a file that is no budget table is refused in one line
    if not entries or any("val_perplexity" not in e for e in entries):
        raise UserError(f"{path} is not a language model's budget table (entries without val_perplexity)")
    exportable = [e for e in entries if _hf_config_holds(net, e["arch"])]
    if not exportable:
        raise UserError(f"no entry of {path} is uniform over its layers, which --format hf needs: use --arch")
    # PSS's one rule of budget switching, ranking language models by perplexity (as ElasticLM does)
    ranked = [{**e, "val_accuracy": -e["val_perplexity"]} for e in exportable]
    try:
        best = exportable[pick_entry(ranked, max_macs, max_ms)]
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    return Arch(best["arch"]), f"budget entry {best['bucket']:g} (val perplexity {best['val_perplexity']:.3f})"


def _hf_config_holds(net: Any, arch: dict[str, int]) -> bool:
    try:
        subnet_config(net, arch)
    except ValueError:
        return False
    return True


def _export_binary(ckpt: Path, out: Path, force: bool) -> int:
    """A trained binary network (``dynaslice binarize``'s RUN or RUN/model.pt) as a 1-bit package."""
    from ..binary.packed import export_binary, is_binary_package
    from ..binary.train import MODEL_FILE, load_binary_model

    source = ckpt / MODEL_FILE if ckpt.is_dir() else ckpt
    if not source.is_file():
        raise UserError(f"{ckpt} holds no {MODEL_FILE}: pass a 'dynaslice binarize' run directory or its {MODEL_FILE}")
    if out.exists() and not force:
        what = "a binary package" if is_binary_package(out) else "in the way"
        raise UserError(f"{out} exists ({what}): pass --force to replace a package, or choose another name")
    model, spec = load_binary_model(source)
    sizes = export_binary(model, out, input_size=(spec["in_chans"], 28, 28))["sizes"]  # binarize trains on 28x28
    print(
        f"exported {spec['method']} to {out}: weights {sizes['binary_bytes'] / 1e3:.1f} kB "
        f"({sizes['float32_over_binary']:.1f}x smaller than float32, {sizes['int8_over_binary']:.1f}x than int8); "
        "run it with dynaslice.serve.load or dynaslice.binary.packed.BinaryRunner"
    )
    return 0


def _export_gated(ckpt: Path, out: Path, data_dir: str | None, trust: list[str] | tuple[str, ...] = ()) -> int:
    net, meta, cfg, _ = load_run_model(str(ckpt), trust=trust)
    if not isinstance(net, GatedSupernet):
        raise UserError(f"{ckpt} is not a gated checkpoint: use --arch to export one subnet")
    if meta.get("stage") != 2:
        print(f"note: {ckpt} is a Stage-I checkpoint: its gate's slimming head is untrained", file=sys.stderr)
    mean, std = _normalisation(cfg, data_dir)
    try:
        export_gated(net.eval(), out, mean=mean, std=std)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    print(f"exported the gated model ({len(net.routes)} routes) to {out}/; run it with dynaslice.onnx_package.GatedOnnxRunner")
    return 0


def _normalisation(cfg: Any, data_dir: str | None) -> tuple[Any, Any]:
    """The dataset's mean/std for a package manifest (so raw images can be fed), or (None, None)."""
    try:
        data = load_split(trusted_data(cfg, data_dir).data, "test", cfg.train.seed)
        return data.mean, data.std
    except (DatasetError, UserError, ValueError):
        print("note: the dataset is not available here: the manifest has no mean/std", file=sys.stderr)
        return None, None


def _export_budget(ckpt: Path, out: Path, data_dir: str | None) -> int:
    source = budget_source(ckpt)
    budget = BudgetNet.load(source).eval()
    _, meta = load_model_file(source if source.is_file() else source / runs.BUDGET_WEIGHTS)
    mean, std = _normalisation(from_dict(meta["config"]), data_dir) if "config" in meta else (None, None)
    try:
        export_budget(budget, out, mean=mean, std=std)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    print(f"exported the budget table ({len(budget.table.entries)} entries) to {out}/; run it with "
          "dynaslice.serve.load or dynaslice.onnx_package.BudgetOnnxRunner")  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="a subnet as plain PyTorch or ONNX, or a gated model as an ONNX package",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("ckpt", metavar="CKPT", help="run directory, checkpoint directory or .safetensors model file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", default=None, metavar="A", help="largest | smallest | x0.5 | routeN | JSON | file.json")
    which.add_argument("--budget-macs", type=parse_macs, default=None, metavar="X", help="PSS runs: e.g. 12M")
    which.add_argument("--budget-ms", type=parse_amount, default=None, metavar="X", help="PSS runs with a latency table")
    which.add_argument("--gated", action="store_true", help="a gated checkpoint as an ONNX package (--out DIR)")
    which.add_argument("--budget-table", action="store_true", help="a PSS run's budget table as an ONNX package (--out DIR)")
    which.add_argument("--binary", action="store_true",
                       help="a 'dynaslice binarize' run as a 1-bit package on the CPU kernel (--out DIR)")  # fmt: skip
    p.add_argument(
        "--format", choices=("torch", "onnx", "hf"), default=None,
        help="default: onnx if --out ends in .onnx; hf: a language-model run's subnet as a Hugging Face directory",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="PATH", help="output file (a directory with --gated)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="packages: the dataset, for the manifest's normalisation")
    add_trust_factory(p)  # --arch: a model file built by the user's own factory
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (a file, or a folder holding a dynaslice package and nothing else)")  # fmt: skip
    p.set_defaults(func=_export)
