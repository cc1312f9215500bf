"""The audit report says first whether the loop worked, then shows how: the failover timeline
from the fault, burn-in per node against the fleet, the collective sweep and goodput; it
separates what was done from what a dry run would have done and from benchmark records; and
everything in it is escaped text in templates, with nothing loaded from elsewhere."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from hypothesis import given
from hypothesis import strategies as st

import aidc
from aidc.audit import charts
from aidc.audit.log import AuditLog
from aidc.audit.report import render_html

from .lab_log import append_goodput_report, build_lab_audit_log


class Sections(HTMLParser):
    """Text of each <section id=...> and of the verdict banner, tags dropped."""

    def __init__(self, page: str):
        super().__init__()
        self.text: dict[str, str] = {}
        self.stack: list[str | None] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.handle_data(" ")  # cells and lines read as separate words
        if tag in ("section", "header"):
            self.stack.append(dict(attrs).get("id"))

    def handle_endtag(self, tag):
        self.handle_data(" ")
        if tag in ("section", "header"):
            self.stack.pop()

    def handle_data(self, data):
        for sid in filter(None, self.stack):
            self.text[sid] = self.text.get(sid, "") + data


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_the_verdict_banner_comes_first_and_says_the_loop_completed_with_its_figures(lab_log):
    _, render = lab_log
    page = render()
    assert page.index('id="verdict"') < page.index("<main>")
    banner = squash(Sections(page).text["verdict"])
    assert "Loop completed: 4 nodes certified; XID 79 on gpu-1" in banner
    assert "training resumed after 2.84 s, 1 step(s) lost" in banner and "Hash chain verified" in banner


def test_the_verdict_says_decided_and_quarantined_with_the_timelines_numbers(lab_log):
    """"quarantine decided" is the controller's verdict, "quarantined" the scheduler's action
    done (aidc.milestones): the banner, the lab loop's figures and the timeline agree."""
    _, render = lab_log
    sections = Sections(render())
    timeline = dict(re.findall(r"(decide|quarantine) \w[\w /]+? (\d+\.\d) #", squash(sections.text["failover"])))
    banner = squash(sections.text["verdict"])
    assert (f"quarantine decided {float(timeline['decide']):g} ms and quarantined {float(timeline['quarantine']):g} ms"
            " after the fault") in banner
    figures = squash(sections.text["summary"])
    assert f"fault to quarantine decided {float(timeline['decide']):g} ms" in figures
    assert f"fault to quarantined {float(timeline['quarantine']):g} ms" in figures


def test_a_loop_that_did_not_complete_says_what_failed(tmp_path):
    db = build_lab_audit_log(tmp_path, completed=False)
    with AuditLog(db, read_only=True) as log:
        banner = squash(Sections(render_html(log)).text["verdict"])
    assert banner.startswith(" Loop did NOT complete")
    assert "training did not finish: gpu-3 stopped answering" in banner
    assert "burn-in failed on gpu-2" in banner and "memcpy_gbps 1.14 GB/s is 41% below the fleet median" in banner


def test_the_failover_timeline_gives_each_step_in_ms_after_the_fault_in_order(lab_log):
    db, render = lab_log
    text = squash(Sections(render()).text["failover"])
    steps = re.findall(r"(detect|decide|quarantine|resume) \w[\w /]+? (\d+\.\d) #\d+ ([\w.]+)", text)
    assert [s[0] for s in steps] == ["detect", "decide", "quarantine", "resume"]
    assert [s[2] for s in steps] == ["health.fault", "failover.decision", "failover.action", "lab.resume"]
    times = [float(s[1]) for s in steps]
    assert times == sorted(times) and times[0] > 0 and times[-1] == 2840.0
    with AuditLog(db, read_only=True) as log:
        summary = log.records(kind="lab.summary")[-1].payload
    assert float(steps[1][1]) == summary["detect_ms"]  # the decide step is the lab's detect_ms


def test_the_timeline_chart_is_inline_svg_with_one_bar_per_step_scaled_to_its_time(lab_log):
    _, render = lab_log
    page = render()
    svg = re.search(r'<svg[^>]*class="timeline".*?</svg>', page, re.S)[0]
    widths = {m[0]: float(m[1]) for m in re.findall(r'class="bar m-(\w+)"[^>]*width="([\d.]+)"', svg)}
    assert list(widths) == ["detect", "decide", "quarantine", "resume"]
    assert widths["detect"] < widths["decide"] < widths["quarantine"] < widths["resume"]
    assert "milliseconds after the fault (T+ms)" in svg


def test_burn_in_shows_each_node_against_the_fleet_median_tolerance_and_floor_with_units(lab_log):
    _, render = lab_log
    page = render()
    text = squash(Sections(page).text["burnin"])
    assert "memory copy (GB/s)" in text and "GEMM fp32 (TFLOP/s)" in text
    assert "fleet median: 1.92 GB/s" in text and "tolerance (25% below median): 1.44 GB/s" in text
    assert "floor: 0.05 GB/s" in text
    assert "gpu-2 FAIL" in text and "gpu-2 1.14 -40.6%" in text
    memcpy = re.search(r'<svg[^>]*aria-label="memory copy per node.*?</svg>', page, re.S)[0]
    assert re.findall(r'class="bar( bad)? m-([\w-]+)"', memcpy).count((" bad", "gpu-2")) == 1
    assert {"median", "threshold", "floor"} <= set(re.findall(r'class="ref (\w+)"', memcpy))


def test_the_collective_sweep_renders_every_collective_of_the_certificate_with_link_fraction(lab_log):
    _, render = lab_log
    text = squash(Sections(render()).text["collectives"])
    for name in ("all_reduce", "all_gather", "reduce_scatter"):
        assert re.search(rf"{name} : peak busbw [\d.]+ GB/s at 4 MiB \(\d+% of link rate\) "
                         r"message size algbw \(GB/s\) busbw \(GB/s\) of link rate", text), name
    assert "link rate 100 Gbit/s" in text and "4 MiB 2.36 3.77 30%" in text


def test_the_burn_ins_own_certificates_give_all_five_sweeps_against_the_spec_link_rate(tmp_path):
    db = build_lab_audit_log(tmp_path, with_collectives=False)
    with AuditLog(db, read_only=True) as log:
        text = squash(Sections(render_html(log)).text["collectives"])
    assert "link rate 25 Gbit/s" in text and "1 KiB" in text
    for op in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"):
        assert op in text, op


def test_goodput_is_given_as_ettr_with_its_definition(lab_log):
    _, render = lab_log
    text = squash(Sections(render()).text["goodput"])
    assert "ETTR 91.2%" in text
    assert "productive training time / wall time of the job's allocation" in text and "Meta" in text


def test_the_goodput_accounting_is_rendered_part_by_part_with_the_advised_interval(tmp_path):
    db = build_lab_audit_log(tmp_path)
    with AuditLog(db) as log:
        append_goodput_report(log)
        text = squash(Sections(render_html(log)).text["goodput"])
    assert "Goodput: job llm" in text and "ETTR 87.0%" in text
    assert "productive 61.2" in text and "restart 4.1" in text and "lost 1.3" in text
    assert "Checkpoint interval advised (Daly 2006): every 12.5 s" in text


def test_dry_runs_and_benchmark_records_are_kept_out_of_the_incident_timeline(lab_log):
    _, render = lab_log
    sections = Sections(render()).text
    incident, dry, bench = (squash(sections[k]) for k in ("timeline", "dry-run", "benchmarks"))
    assert "dry-run: would release" in dry and "dry-run" not in incident
    assert "burnin.certificate" in bench and "burnin.certificate" not in incident
    assert "failover.action" in incident and "lab.inject" in incident


def test_generated_at_version_and_stack_are_stated(lab_log):
    _, render = lab_log
    page = render(now=1.8e9)
    assert f"Generated 2027-01-15 08:00:00.000Z by aidc {aidc.__version__}" in page
    assert "stack <strong>lab</strong>" in page


def test_record_text_is_escaped_and_the_page_loads_nothing_from_elsewhere(tmp_path):
    db = build_lab_audit_log(tmp_path)
    with AuditLog(db) as log:
        log.append("health.fault", '<script>alert("x")</script> & <img src=x onerror=1>', actor="t", node="gpu-0")
        page = render_html(log)
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;img src=x onerror=1&gt;" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_nice_ticks_reach_past_the_largest_value_in_round_steps():
    assert charts.nice_ticks(2840) == [0, 1000, 2000, 3000]
    assert charts.nice_ticks(1.92) == [0, 0.5, 1.0, 1.5, 2.0]
    assert charts.nice_ticks(0) == [0.0, 1.0]


def test_a_figure_recorded_as_nan_is_left_out_of_the_charts_not_drawn(tmp_path):
    db = build_lab_audit_log(tmp_path)
    with AuditLog(db) as log:
        payload = log.records(kind="burnin.certificate", node="gpu-3")[-1].payload
        payload["metrics"]["memcpy_gbps"] = float("nan")
        log.append("burnin.certificate", "passed burn-in", actor="burnin", node="gpu-3", payload=payload)
        page = render_html(log)
    memcpy = re.search(r'<svg[^>]*aria-label="memory copy per node.*?</svg>', page, re.S)[0]
    assert "nan" not in memcpy.lower() and "m-gpu-3" not in memcpy and "m-gpu-2" in memcpy


def test_without_a_lab_loop_the_verdict_is_whether_every_faulty_node_was_quarantined(tmp_path):
    from aidc.events import Action, FaultEvent, FaultKind
    from aidc.failover.controller import FailoverController
    from aidc.failover.scheduler import LabScheduler
    from aidc.spec import parse_spec
    from aidc.store import Store

    from .lab_log import SPEC

    spec = parse_spec(SPEC)
    for n in spec.nodes():
        (tmp_path / "lab" / "nodes" / n.name).mkdir(parents=True)
    store, log = Store(tmp_path / "state.db"), AuditLog(tmp_path / "audit.db")
    try:
        for node in ("gpu-0", "gpu-2"):  # max_unavailable 1: the second one is refused, not quarantined
            store.append(FaultEvent(node, FaultKind.XID, Action.REBOOT_NODE, "XID 79", "kmsg", gpu=0, xid=79))
            log.append("health.fault", "XID 79 on gpu 0", actor="health", node=node, payload={"xid": 79})
        FailoverController(spec, store, log, LabScheduler(tmp_path / "lab"), dry_run=False).run_once()
        page = render_html(log)
    finally:
        store.close()
        log.close()
    assert squash(Sections(page).text["verdict"]).startswith(" 2 fault(s) on gpu-0, gpu-2: NOT quarantined: gpu-2")
    assert '<header id="verdict" class="verdict bad">' in page


# --- Reading it at a glance: collapsed sweeps, rounded sizes, figures a link cannot carry flagged.

class Details(HTMLParser):
    """Each <details> in a section: (open?, summary text, text inside)."""

    def __init__(self, page: str, section: str):
        super().__init__()
        self.section, self.inside, self.depth = section, False, 0
        self.found: list[dict] = []
        self.summary = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.inside = dict(attrs).get("id") == self.section
        if not self.inside:
            return
        if tag == "details":
            self.found.append({"open": "open" in dict(attrs), "summary": "", "text": ""})
        elif tag == "summary":
            self.summary = True

    def handle_endtag(self, tag):
        if tag == "summary":
            self.summary = False
        elif tag == "section":
            self.inside = False

    def handle_data(self, data):
        if self.inside and self.found:
            self.found[-1]["summary" if self.summary else "text"] += data + " "


def with_broadcast_at(db, fraction: float) -> None:
    """A newer certificate whose broadcast sweep reaches `fraction` of the link rate at 4 MiB."""
    with AuditLog(db) as log:
        cert = log.records(kind="burnin.certificate", node="gpu-spare-0")[-1].payload
        link = cert["link_rate_gbps"]
        rows = [{"bytes": n, "algbw_gbps": fraction * link * n / 2 ** 22, "busbw_gbps": fraction * link * n / 2 ** 22,
                 "link_fraction": fraction * n / 2 ** 22} for n in (2 ** 12, 2 ** 17, 2 ** 22)]
        log.append("burnin.certificate", "passed burn-in", actor="burnin", node="gpu-spare-0",
                   payload={**cert, "collectives": {**cert["collectives"], "broadcast": rows}})


def test_each_collectives_table_is_collapsed_under_a_summary_with_its_peak(lab_log):
    _, render = lab_log
    details = Details(render(), "collectives").found
    assert sorted(d["summary"].split()[0] for d in details) == ["all_gather", "all_reduce", "reduce_scatter"]
    assert not any(d["open"] for d in details)
    assert all("peak busbw" in d["summary"] and "message size" in d["text"] for d in details)


def test_message_sizes_are_given_in_rounded_binary_units():
    assert [charts.size_label(n) for n in (512, 4096, 4080, 1572864, 2 ** 30 + 1)] == \
        ["512 B", "4 KiB", "3.98 KiB", "1.5 MiB", "1 GiB"]


def significant_digits(number: str) -> int:
    return len(number.replace(".", "").strip("0"))


@given(st.integers(min_value=1, max_value=2 ** 49))
def test_a_size_label_has_at_most_three_significant_digits_and_reads_back_within_half_a_percent(n):
    number, unit = charts.size_label(n).split()
    scale = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}[unit]
    assert significant_digits(number) <= 3 and 1 <= float(number) < 1024
    assert abs(float(number) * scale - n) <= 0.005 * n


def test_no_size_in_the_collective_tables_has_more_than_three_significant_digits(tmp_path):
    db = build_lab_audit_log(tmp_path, with_collectives=False)  # the burn-in's own sizes, divided among 5 ranks
    with AuditLog(db, read_only=True) as log:
        text = squash(Sections(render_html(log)).text["collectives"])
    sizes = re.findall(r"([\d.]+) (?:B|KiB|MiB|GiB)\b", text)
    assert sizes and all(significant_digits(s) <= 3 for s in sizes), sizes


def test_a_bus_bandwidth_above_the_link_rate_is_flagged_implausible_in_the_page_and_the_json(tmp_path):
    from aidc.audit.report import render_json

    db = build_lab_audit_log(tmp_path)
    with_broadcast_at(db, 1.33)
    with AuditLog(db, read_only=True) as log:
        page, data = render_html(log), render_json(log)
    text = squash(Sections(page).text["collectives"])
    assert "implausible" in text and "broadcast" in text
    assert re.search(r'class="num implausible"[^>]*>133%', page)
    flags = [f for f in data["flags"] if f["kind"] == "above_link_rate"]
    assert [(f["collective"], f["bytes"], f["link_fraction"]) for f in flags] == [("broadcast", 2 ** 22, 1.33)]


def test_figures_within_the_link_rate_raise_no_flag(tmp_path):
    from aidc.audit.report import render_json

    db = build_lab_audit_log(tmp_path)
    with_broadcast_at(db, 0.9)
    with AuditLog(db, read_only=True) as log:
        page, data = render_html(log), render_json(log)
    assert data["flags"] == [] and "implausible" not in squash(Sections(page).text["collectives"])


def test_a_verification_failure_without_a_record_number_names_no_record(lab_log):
    from aidc.audit.log import VerifyResult

    db, _ = lab_log
    with AuditLog(db, read_only=True) as log:
        broken = VerifyResult(False, 12, None, f"anchor file {db}.anchor is missing")
        page = render_html(log, broken)
    banner = squash(Sections(page).text["verdict"])
    assert "None" not in banner and f"Verification FAILED: anchor file {db}.anchor is missing" in banner
