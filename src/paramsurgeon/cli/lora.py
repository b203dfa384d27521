"""extract-lora, which writes an adapter directory, not a checkpoint, and prints each module's
reconstruction error (merge-lora is an operation like the others: cli/operations.py runs it)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..declare import option
from ..ops.lora import ExtractLora
from ..report import render
from ..sizes import human_bytes, plural
from .console import color_on_stdout, emit, loader, note, open_checkpoint, terminal_width
from .options import Read


@dataclass(kw_only=True)
class ExtractRun:
    """What extract-lora prints and whether it writes."""

    dry_run: bool = option(False, "--dry-run", help="Print the modules and ranks; compute and write nothing.")
    json: bool = option(False, "--json", help="Print the modules as JSON on standard output.")


def run_extract_lora(extract: ExtractLora, read: Read, run: ExtractRun) -> None:
    """A PEFT LoRA adapter whose merge into BASE approximates TUNED: a truncated SVD of each changed
    weight's delta (B = U_r sqrt(S_r), A = sqrt(S_r) Vh_r), loadable by PeftModel.from_pretrained.

    Unchanged tensors are skipped; changed 1-D tensors are saved whole (modules_to_save, with
    the module's submodules, or a targeted module's bias). Prints each module's relative reconstruction error.
    """
    from ..formats import peft
    from ..formats.directories import refuse_foreign
    from ..ops.lora.extraction import adapter_tensors, plan_extraction

    load = loader(read)
    base, tuned = (open_checkpoint(path, load, role, named=True) for path, role in ((extract.base, "base"),
                                                                                     (extract.tuned, "tuned")))
    load.inputs.refuse_overwrite(extract.output)  # before the work, and with --dry-run as without
    refuse_foreign(extract.output, extract.output, peft.is_adapter_file, "a PEFT adapter")
    extraction = plan_extraction(extract, base, tuned, compute=not run.dry_run)
    for message in extraction.notes:
        note(f"extract-lora: {message}")
    if run.json:
        emit(render.to_json(render.extraction_document(extract, extraction, run.dry_run)))
    else:
        emit(render.extraction_text(extraction, extract.output, run.dry_run, terminal_width(), color_on_stdout()))
    if run.dry_run:
        return
    peft.write_adapter(extract.output, adapter_tensors(extraction), extraction.config, load.inputs)
    size = sum(os.path.getsize(os.path.join(extract.output, n)) for n in os.listdir(extract.output))
    whole = len(extraction.whole)
    note(f"extract-lora: {plural(len(extraction.modules), 'module')} (rank {extract.rank})"
         + (f", {plural(whole, 'tensor')} saved whole" if whole else "")
         + (f", {plural(len(extraction.skipped), 'unchanged tensor')} skipped" if extraction.skipped else "")
         + f"; wrote {extract.output} ({human_bytes(size)})")


__all__ = ["ExtractRun", "run_extract_lora"]
