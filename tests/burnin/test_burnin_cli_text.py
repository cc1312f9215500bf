"""`aidc burnin run`'s tables show data as text: a reason or node name holding brackets is
printed as written, not taken for rich markup (and dropped), and sizes read in binary units."""

from __future__ import annotations

from rich.console import Console

from aidc.burnin.report import BurninReport, NodeResult
from aidc.cli.burnin_cmd import _collectives_table, _table


def rendered(renderable) -> str:
    console = Console(record=True, width=240, color_system=None)
    console.print(renderable)
    return console.export_text()


def report(reason: str) -> BurninReport:
    node = NodeResult("gpu-[0]", "SIM", False, metrics={"memcpy_gbps": 1.1}, passed=False, reasons=[reason])
    rows = [{"bytes": 4080, "time_us": 40.0, "algbw_gbps": 0.1, "busbw_gbps": 0.16, "link_fraction": 0.13,
             "correct": True}]
    return BurninReport("lab", {"gpu-[0]": node}, {"link_rate_gbps": 1.25, "collective_ranks": 5,
                                                  "collective_backend": "gloo", "min_busbw_fraction": 0.01,
                                                  "collectives": {"all_gather": rows}})


def test_reasons_and_names_with_brackets_print_as_written():
    text = rendered(_table(report("link [rail1] down: [bold]not markup[/bold]")))
    assert "link [rail1] down: [bold]not markup[/bold]" in text and "gpu-[0]" in text


def test_the_collectives_table_gives_sizes_in_binary_units():
    assert "3.98 KiB" in rendered(_collectives_table(report("-")))


def test_a_figure_above_the_link_rate_is_marked_implausible():
    above = report("-")
    above.fleet["collectives"]["all_gather"][0].update(link_fraction=1.33, above_link_rate=True)
    assert "133.0% implausible" in rendered(_collectives_table(above))
    assert "implausible" not in rendered(_collectives_table(report("-")))
