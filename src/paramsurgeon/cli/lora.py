"""extract-lora, which writes an adapter directory, not a checkpoint, and prints each module's
reconstruction error (merge-lora is an operation like the others: cli/operations.py runs it)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..declare import option
from ..ops.lora import ExtractLora
from ..report import render
from ..report.tables import Column
from ..report.tables import render as table
from ..sizes import human_bytes, plural
from .console import color_on_stdout, emit, loader, note, terminal_width
from .options import Read


@dataclass(kw_only=True)
class ExtractRun:
    """What extract-lora prints and whether it writes."""

    dry_run: bool = option(False, "--dry-run", help="Print the modules and ranks; compute and write nothing.")
    json: bool = option(False, "--json", help="Print the modules as JSON on standard output.")


def run_extract_lora(extract: ExtractLora, read: Read, run: ExtractRun) -> None:
    """A PEFT LoRA adapter whose merge into BASE approximates TUNED: a truncated SVD of each changed
    weight's delta (B = U_r sqrt(S_r), A = sqrt(S_r) Vh_r), loadable by PeftModel.from_pretrained.

    Unchanged tensors are skipped; changed 1-D tensors are saved whole (modules_to_save, or a
    targeted module's bias). Prints each module's relative reconstruction error.
    """
    from ..formats import peft
    from ..formats.directories import refuse_foreign
    from ..ops.lora.extraction import adapter_tensors, plan_extraction

    load = loader(read)
    base, tuned = load.checkpoint(extract.base, read.key, "base"), load.checkpoint(extract.tuned, read.key, "tuned")
    load.inputs.refuse_overwrite(extract.output)  # before the work, and with --dry-run as without
    refuse_foreign(extract.output, extract.output, peft.is_adapter_file, "a PEFT adapter")
    extraction = plan_extraction(extract, base, tuned, compute=not run.dry_run)
    for message in extraction.notes:
        note(f"extract-lora: {message}")
    rows = extraction.rows
    if run.json:
        emit(render.to_json({"schema_version": render.SCHEMA_VERSION, "command": "extract-lora", "base": extract.base, "tuned": extract.tuned,
                             "output": extract.output, "dry_run": run.dry_run, "config": extraction.config,
                             "modules": rows}))
    else:
        cells = [[r["tensor"], "x".join(map(str, r["shape"])), r["layout"], str(r["rank"] or "-"),
                  "-" if r["error"] is None or r["rank"] is None else f"{r['error']:.3g}"] for r in rows]
        columns = [Column("tensor"), Column("shape", True), Column("layout"), Column("rank", True),
                   Column("error", True)]
        if run.dry_run:
            emit(f"extract-lora: {plural(len(rows), 'tensor')} would go into {extract.output} (dry run: nothing"
                 " written)\n")
        emit(table(columns[:-1] if run.dry_run else columns, [c[:-1] for c in cells] if run.dry_run else cells,
                   terminal_width(), color_on_stdout())[0])
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
