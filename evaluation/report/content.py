"""Turn a :class:`~evaluation.results.Results` into a report :class:`Document` and its PNG figures.

Nothing here computes a number: values are read from the results and formatted
(:mod:`evaluation.report.format`); figures plot the same fields.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from evaluation.report import figures
from evaluation.report.document import Bullets, Code, Document, Figure, Paragraph, Section, Table
from evaluation.report.format import DASH, METRIC_LABELS, mean_ci, median_iqr, num, pvalue, seconds
from evaluation.report.membership import kind_sections
from evaluation.results import ExtractionTable, ExtractionTestSet, ModelRef, QueriesToTarget, Results, ScoreTests

CELL_TEXT = {
    "A": ("victim", "ground truth"),
    "B": ("surrogate", "victim"),
    "C": ("surrogate", "ground truth"),
}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _fname(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


class _Builder:
    def __init__(self, results: Results, results_dir: Path, out_dir: Path) -> None:
        self.r = results
        self.results_dir = results_dir
        self.out_dir = out_dir
        self.fig_dir = out_dir / "figures"
        self.figures: list[Path] = []
        self.anchors: set[str] = set()

    def section(self, title: str, level: int = 2) -> Section:
        anchor, i = _slug(title), 1
        while anchor in self.anchors:
            i += 1
            anchor = f"{_slug(title)}-{i}"
        self.anchors.add(anchor)
        return Section(title, level, anchor=anchor)

    def figure(self, path: Path | None, caption: str) -> Figure | None:
        if path is None:
            return None
        self.figures.append(path)
        return Figure(path, path.relative_to(self.out_dir).as_posix(), caption)

    # --- sections ------------------------------------------------------------------------------------

    def build(self) -> Document:
        r = self.r
        done = sum(c.status == "done" for c in r.cells)  # every kind
        failed = sum(c.status == "failed" for c in r.cells)
        sub = f"{r.kind} `{r.name}` · created {r.created_at} · Heist {r.environment.heist or DASH}"
        if r.cells:
            sub += f" · {len(r.cells)} cells ({done} done, {failed} failed)"
        doc = Document(title=f"Heist report: {r.name}", subtitle=sub)
        doc.sections.append(self.about())
        if r.extraction_cells:
            doc.sections.extend(self.efficiency())
            doc.sections.extend(self.defenses())
            doc.sections.extend(self.attackers())
        for i, table in enumerate(r.extraction):
            doc.sections.extend(self.extraction(table, i))
        if r.paper:
            doc.sections.append(self.paper())
        if any(c.input_pixels for c in r.extraction_cells):
            doc.sections.append(self.pixels_and_fields())
        if r.extraction_cells:
            doc.sections.append(self.cells())
        for kind in dict.fromkeys(c.kind for c in r.cells if c.kind != "extraction"):
            doc.sections.extend(kind_sections(kind, r, self))
        if r.samples:
            doc.sections.extend(self.samples())
        doc.sections.extend(self.reproducibility())
        return doc

    def about(self) -> Section:
        r = self.r
        s = self.section("How to read this report")
        fn = r.feature_network.label if r.feature_network else (r.feature_network_note or
                                                                "none: FID and KID were not computed")
        s.add(
            Paragraph(f"Every number below is read from `results.json` (schema version {r.schema_version}) in "
                      "this report's folder; nothing is recomputed when rendering."),
            Bullets([
                "**victim**: the model behind the API; **surrogate**: the model the attacker trained from "
                "the victim's answers; **ground truth (GT)**: the correct output for an input.",
                "**fidelity**: how closely the surrogate copies the *clean* (undefended) victim, as PSNR in dB "
                "on benchmark images (higher = better copy = worse for the victim's owner).",
                "**utility cost**: how much a defense lowers the victim's quality for honest users (dB of PSNR "
                "against ground truth lost); **attack degradation**: how much fidelity the defense takes from "
                "the attacker at the same budget (dB).",
                "Means are followed by a 95% percentile-bootstrap confidence interval in brackets; medians by the "
                "interquartile range (IQR). PSNR and FID use 2 decimals, SSIM 4, KID 4 significant digits.",
                f"Image metrics: {r.metric_settings.describe()}; SSIM window {r.metric_settings.ssim_kernel_size} px "
                f"Gaussian (sigma {r.metric_settings.ssim_kernel_sigma:g}). Identical images score 80 dB PSNR "
                "(piq's epsilon).",
                f"Feature network for FID/KID: {fn}.",
            ]),
        )
        return s

    def extraction(self, t: ExtractionTable, index: int) -> list[Section]:
        head = self.section(f"Extraction: {t.surrogate.name} vs {t.victim.name}")
        head.add(
            Paragraph(f"Task `{t.task}`. Victim `{t.victim.name}`{self.where(t.victim)}, surrogate "
                      f"`{t.surrogate.name}`{self.where(t.surrogate)}. Pairs from: {t.pair_source}."),
            Bullets([
                "**A** victim vs ground truth: how good the victim is.",
                "**B** surrogate vs victim: the attacker's proxy, the only cell an attacker can measure.",
                "**C** surrogate vs ground truth: how good the stolen model really is (compare with A).",
            ]),
        )
        out = [head]
        for ts in t.test_sets:
            out.append(self.extraction_set(t, ts, index))
        return out

    @staticmethod
    def where(m: ModelRef) -> str:
        loc = m.path or m.url
        return f" (`{loc}`)" if loc else ""

    def extraction_set(self, t: ExtractionTable, ts: ExtractionTestSet, index: int) -> Section:
        s = self.section(f"Test set {ts.name} ({ts.n_images} images, {ts.spec})", 3)
        metrics = [m for m in ("psnr", "ssim", "ms_ssim") if any(m in c.metrics for c in ts.cells.values())]
        header = ["Cell", "Output", "Compared with", "n"] + [f"{METRIC_LABELS[m]} mean [95% CI]" for m in metrics]
        header += ["FID", "KID mean ± std"]
        rows = []
        for cell in ("A", "B", "C"):
            comp = ts.cells.get(cell)  # type: ignore[call-overload]
            if comp is None:
                continue
            row = [cell, *CELL_TEXT[cell], num(comp.n_images)]
            row += [mean_ci(comp.metrics[m].summary if m in comp.metrics else None, m) for m in metrics]
            row += [num(comp.fid.value, "fid") if comp.fid else DASH,
                    f"{num(comp.kid.mean, 'kid')} ± {num(comp.kid.std, 'kid')}" if comp.kid else DASH]
            rows.append(row)
        where = f"extraction[{index}].test_sets[{ts.name}]"
        s.add(Table(header, rows, caption=f"Means with 95% CI (results.json: {where}.cells[A, B, C].metrics)"))
        med_rows = []
        for cell in ("A", "B", "C"):
            comp = ts.cells.get(cell)  # type: ignore[call-overload]
            if comp is not None:
                med_rows.append([cell] + [median_iqr(comp.metrics[m].summary if m in comp.metrics else None, m)
                                          for m in metrics])
        s.add(Table(["Cell"] + [f"{METRIC_LABELS[m]} median (IQR)" for m in metrics], med_rows,
                    caption="Medians with interquartile range"))
        if ts.tests:
            s.add(Paragraph(f"Victim (A) vs surrogate (C) quality, per image: Welch's t-test for a difference and "
                            f"TOST for equivalence within Cohen's d ±{t.d_bound:g} (alpha {t.alpha:g}), as in the "
                            "extraction paper. 'Equivalent' means the two one-sided tests both reject a difference "
                            "larger than the margin."))
            s.add(self.tests_table(ts.tests, t.d_bound, f"{where}.tests"))
        notes = list(dict.fromkeys(n for c in ts.cells.values() for n in c.notes))
        if notes:
            s.add(Bullets(notes))
        fig = figures.score_distribution_figure(
            ts, "psnr" if "psnr" in metrics else metrics[0],
            self.fig_dir / f"extraction{index}_{_fname(ts.name)}_scores.png") if metrics else None
        f = self.figure(fig, f"{ts.name}: per-image scores of cells A, B and C.")
        if f:
            s.add(f)
        return s

    def tests_table(self, tests: dict[str, ScoreTests], d_bound: float, where: str) -> Table:
        rows = []
        for metric, st in tests.items():
            w, t = st.welch, st.tost
            kind = metric
            if t.equivalent:
                verdict = f"equivalent within d = ±{d_bound:g}"
            elif t.equivalent is False:
                verdict = "equivalence not shown"
            else:
                verdict = t.note or "not testable"
            if w.significant:
                verdict += "; difference significant"
            margin = f"±{num(t.high, kind)}" if t.high is not None else DASH
            rows.append([
                METRIC_LABELS.get(metric, metric), num(w.mean_a, kind), num(w.mean_b, kind), num(w.diff, kind),
                f"{num(w.t, 't')} ({num(w.df, 'df')})" if w.t is not None else DASH, pvalue(w.p_value),
                margin, pvalue(t.p_value), num(t.cohens_d, "d"), verdict,
            ])
        return Table(["Metric", "Victim mean (A)", "Surrogate mean (C)", "Difference A − C", "Welch t (df)",
                      "Welch p", "TOST margin (raw)", "TOST p", "Cohen's d", "Verdict"], rows,
                     caption=f"Welch and TOST (results.json: {where})")

    def efficiency(self) -> list[Section]:
        d = self.r.derived
        s = self.section("Attack efficiency")
        if d is None:
            s.add(Paragraph("No derived summaries in results.json (run `heist eval report` to add them)."))
            return [s]
        s.add(Paragraph(f"Surrogate fidelity to the clean victim ({d.target_metric.upper()}) against the queries "
                        f"the attacker used. The dotted line is the target {num(d.target_value, d.target_metric)} "
                        f"{'dB' if d.target_metric == 'psnr' else ''}; error bars are 95% bootstrap CIs over "
                        "benchmark images."))
        victims = list(dict.fromkeys(c.victim for c in d.curves))
        for v in victims:
            curves = [c for c in d.curves if c.victim == v]
            path = figures.fidelity_curves_figure(curves, v, self.fig_dir / f"curves_{_fname(v)}.png",
                                                  d.target_value, "dB" if d.target_metric == "psnr" else "")
            f = self.figure(path, f"{v}: fidelity vs queries per defense and strategy (results.json: "
                                  "derived.curves).")
            if f:
                s.add(f)
        if d.queries_to_target:
            rows = [[q.victim, q.defense, q.strategy, num(q.target, q.metric), self.needed(q),
                     num(q.max_queries)] for q in d.queries_to_target]
            s.add(Table(["Victim", "Defense", "Strategy", f"Target {d.target_metric.upper()}", "Queries needed",
                         "Most queries measured"], rows,
                        caption="Queries to reach the target, linear interpolation between measured budgets; "
                                "'≤' when the smallest budget already reached it (results.json: "
                                "derived.queries_to_target)"))
        return [s]

    @staticmethod
    def needed(q: QueriesToTarget) -> str:
        if q.queries is None:
            return f"not reached (> {q.max_queries})"
        return f"≤ {num(q.queries, 'queries')}" if q.at_first_point else num(q.queries, "queries")

    def defenses(self) -> list[Section]:
        d = self.r.derived
        out = []
        if d is None or not d.defense_table:
            return out
        head = self.section("Defenses: utility cost vs attack degradation")
        head.add(Paragraph("Per victim and attack strategy: what each defense costs honest users (columns 2-6) "
                           "and what it takes from the attacker (attacker PSNR to the clean victim per budget, "
                           "and degradation relative to no defense). A defense is Pareto-optimal when no other "
                           "defense has both a lower utility cost and a higher degradation."))
        out.append(head)
        budgets = [str(b) for b in (self.r.budgets or sorted({c.budget for c in self.r.extraction_cells}))]
        groups = list(dict.fromkeys((row.victim, row.strategy) for row in d.defense_table))
        for victim, strategy in groups:
            rows_src = [row for row in d.defense_table if row.victim == victim and row.strategy == strategy]
            s = self.section(f"{victim} ({strategy})" if strategy else victim, 3)
            header = ["Defense", "Honest-user PSNR (dB)", "Honest-user SSIM", "Victim PSNR vs GT, no defense",
                      "Victim PSNR vs GT, defended", "Utility cost (dB)"]
            header += [f"Attacker PSNR @{b}" for b in budgets] + [f"Degradation @{b} (dB)" for b in budgets]
            header.append("Pareto")
            rows = []
            for row in rows_src:
                cells = [row.defense, num(row.honest_psnr, "psnr"), num(row.honest_ssim, "ssim"),
                         num(row.quality_clean_psnr, "psnr"), num(row.quality_defended_psnr, "psnr"),
                         num(row.utility_cost_db, "db")]
                cells += [num(row.attacker_psnr.get(b), "psnr") for b in budgets]
                cells += [num(row.attack_degradation_db.get(b), "db") for b in budgets]
                cells.append("yes" if row.pareto_optimal else "no")
                rows.append(cells)
            s.add(Table(header, rows, caption="Honest-user PSNR/SSIM: defended vs clean victim output (80 dB = "
                                              "identical). results.json: derived.defense_table"))
            for front in d.pareto:
                if front.victim == victim and front.strategy == strategy:
                    missing = [row.defense for row in rows_src if row.defense not in front.points]
                    path = figures.pareto_figure(
                        front, self.fig_dir / f"pareto_{_fname(victim)}_{_fname(strategy or 'all')}.png", missing)
                    f = self.figure(path, f"{victim}: utility cost vs attack degradation at {front.budget} queries; "
                                          f"Pareto-optimal: {', '.join(front.front)}.")
                    if f:
                        s.add(f)
            out.append(s)
        return out

    def attackers(self) -> list[Section]:
        """Perturbation defenses against plain and adaptive attackers: one Pareto plot per victim and the
        table victim x defense -> honest PSNR, attacker loss at the two largest budgets (derived.attacker_table),
        with the best defense per victim (derived.best_defenses)."""
        from evaluation.defense_scoring import attacker_pareto

        d = self.r.derived
        if d is None or not any(row.attacker != "plain" for row in d.attacker_table):
            return []
        budgets = [str(b) for b in (self.r.budgets or sorted({c.budget for c in self.r.extraction_cells}))][-2:]
        attackers = list(dict.fromkeys(row.attacker for row in d.attacker_table))
        s = self.section("Defenses against plain and adaptive attackers")
        s.add(Paragraph(
            "Honest-user PSNR: defended vs clean victim output on the benchmark images (80 dB = identical). "
            "Attacker loss: the attacker's fidelity (PSNR of its surrogate to the clean victim) against the "
            "undefended victim minus against this defense, same attacker and budget (dB; higher = the defense "
            "hurts the thief more). The adaptive attacker trains one surrogate per counter-measure on the same "
            "pairs and keeps the best (an oracle choice, so an upper bound for these counter-measures); the "
            "counter-measure it kept is in brackets."))
        header = ["Victim", "Defense", "Honest PSNR (dB)"]
        for who in attackers:
            header += [f"{who} PSNR @{b}" for b in budgets] + [f"{who} loss @{b} (dB)" for b in budgets]
        rows = []
        keyed = {(row.victim, row.defense, row.attacker): row for row in d.attacker_table}
        for victim, label in dict.fromkeys((row.victim, row.defense) for row in d.attacker_table):
            first = keyed[(victim, label, attackers[0])]
            cells = [victim, label, num(first.honest_psnr, "psnr")]
            for who in attackers:
                row = keyed.get((victim, label, who))
                cells += [num(row.attacker_psnr.get(b) if row else None, "psnr") for b in budgets]
                for b in budgets:
                    loss = num(row.loss_db.get(b) if row else None, "db")
                    counter = row.counter.get(b) if row else None
                    cells.append(f"{loss} ({counter})" if counter and loss != DASH else loss)
            rows.append(cells)
        s.add(Table(header, rows, caption="results.json: derived.attacker_table (fidelity from cells, honest PSNR "
                                          "from utility)"))
        best = []
        for b in d.best_defenses:
            what = (f"**{b.defense}** ({num(b.loss_db, 'db')} dB loss at honest PSNR {num(b.honest_psnr, 'psnr')} "
                    "dB)" if b.defense else f"none: no defense with honest PSNR >= {b.min_honest_psnr:g} dB costs this "
                                            "attacker any fidelity")
            best.append(f"{b.victim}, {b.attacker} attacker, {b.budget} queries: {what}")
        if best:
            s.add(Paragraph(f"Best defense per victim: the largest positive attacker loss at the largest budget among "
                            f"defenses with honest-user PSNR >= {d.best_defenses[0].min_honest_psnr:g} dB "
                            "(results.json: derived.best_defenses)."), Bullets(best))
        ref = int(budgets[-1])
        for victim in dict.fromkeys(row.victim for row in d.attacker_table):
            series = attacker_pareto(d.attacker_table, victim, ref)
            mins = {b.min_honest_psnr for b in d.best_defenses}
            path = figures.attacker_pareto_figure(victim, ref, series,
                                                  self.fig_dir / f"attackers_pareto_{_fname(victim)}.png",
                                                  min(mins) if mins else None)
            f = self.figure(path, f"{victim}: honest-user PSNR vs attacker fidelity loss at {ref} queries, plain and "
                                  "adaptive attacker (results.json: derived.attacker_table).")
            if f:
                s.add(f)
        return [s]

    def cells(self) -> Section:
        s = self.section("Campaign cells")
        rows = []
        for c in self.r.extraction_cells:
            fid = c.fidelity.metrics.get("psnr") if c.fidelity else None
            ssim = c.fidelity.metrics.get("ssim") if c.fidelity else None
            qual = c.quality.metrics.get("psnr") if c.quality else None
            times = ", ".join(f"{k} {seconds(v)}" for k, v in c.wall_times.items()) or DASH
            rows.append([c.id + (f" ({c.attacker}: {c.counter})" if c.attacker != "plain" else ""), c.status,
                         num(c.queries_used), num(c.queries_refused),
                         mean_ci(fid.summary if fid else None, "psnr"), mean_ci(ssim.summary if ssim else None, "ssim"),
                         mean_ci(qual.summary if qual else None, "psnr"),
                         c.training.describe() if c.training else DASH, times, c.error or ""])
        s.add(Table(["Cell (victim/defense/budget/strategy)", "Status", "Queries used", "Refused (429)",
                     "Fidelity PSNR (dB)", "Fidelity SSIM", "Surrogate PSNR vs GT", "Surrogate training", "Wall time",
                     "Error"], rows,
                    caption="Fidelity: surrogate vs clean victim on benchmark images; training: optimisation steps "
                            "and why they stopped (time budget, plateau of held-out fidelity, step limit), which "
                            "depend on the machine when the budget is time (results.json: cells)"))
        return s

    def paper(self) -> Section:
        """The source paper's published numbers in a column beside ours (results.json: paper)."""
        s = self.section("The paper's numbers beside ours")
        s.add(Paragraph(f"Source: {self.r.paper_source or DASH}. Ours: defense `none`; the budget column names "
                        "the cell. A = victim vs ground truth, B = surrogate vs victim, C = surrogate vs ground "
                        "truth. The papers used other victims, data and image sizes: compare orders of magnitude "
                        "and which side of the baseline a number falls, not decimals."))
        rows = [[p.label, p.victim, p.cell, METRIC_LABELS.get(p.metric, p.metric), num(p.budget),
                 p.paper if isinstance(p.paper, str) else f"{p.paper:g}",
                 DASH if p.ours is None else f"{p.ours:.4g}", p.note] for p in self.r.paper]
        s.add(Table(["Row", "Victim", "Cell", "Metric", "Queries", "Paper", "Ours", "Note"], rows,
                    caption="results.json: paper"))
        return s

    def pixels_and_fields(self) -> Section:
        """Fidelity against query pixels and surrogate receptive field (single-example imitation, Fig. 3)."""
        s = self.section("Fidelity vs query pixels and receptive field")
        rows = []
        for c in self.r.extraction_cells:
            fid = c.fidelity.metrics.get("psnr") if c.fidelity else None
            rows.append([c.victim, c.defense, c.attacker, num(c.budget), num(c.input_pixels), c.surrogate_kind or DASH,
                         num(c.receptive_field), mean_ci(fid.summary if fid else None, "psnr")])
        s.add(Table(["Victim", "Defense", "Attacker", "Queries", "Query pixels", "Surrogate", "Receptive field (px)",
                     "Fidelity PSNR (dB)"], rows,
                    caption="results.json: cells (input_pixels, surrogate_kind, receptive_field, fidelity)"))
        return s

    def samples(self) -> list[Section]:
        s = self.section("Sample images")
        s.add(Paragraph("A few benchmark images through each model, shown at a common size (small inputs are "
                        "enlarged with nearest-neighbour sampling)."))
        for i, grid in enumerate(self.r.samples):
            name = f"grid_{i}_{_fname(grid.title)}.png"
            path = figures.image_grid_figure(grid, self.results_dir, self.fig_dir / name)
            f = self.figure(path, grid.title)
            if f:
                s.add(f)
        return [s]

    def reproducibility(self) -> list[Section]:
        r = self.r
        s = self.section("Reproducibility")
        if r.command:
            s.add(Paragraph("Command:"), Code(r.command, "sh"))
        if r.seeds:
            s.add(Table(["Seed", "Value"], [[k, num(v)] for k, v in r.seeds.items()], caption="Seeds"))
        if r.wall_times:
            s.add(Table(["Phase", "Wall time"], [[k, seconds(v)] for k, v in r.wall_times.items()],
                        caption="Wall time by phase"))
        if r.peak_memory_mb is not None:
            s.add(Paragraph(f"Peak memory (RSS): {num(r.peak_memory_mb, 'mb')} MiB."))
        env = r.environment
        env_rows = [["Heist", env.heist], ["Python", env.python], ["Platform", env.platform],
                    ["Device", env.device], ["Host", env.hostname], ["Git commit", env.git_commit or DASH]]
        env_rows += [[k, v] for k, v in env.packages.items()]
        s.add(Table(["Component", "Version"], env_rows, caption="Environment"))
        if r.config_text:
            s.add(Paragraph(f"Configuration file `{r.config_path or ''}`, exactly as run:"),
                  Code(r.config_text, "toml"))
        elif r.config:
            s.add(Paragraph("Configuration, exactly as run:"), Code(json.dumps(r.config, indent=2), "json"))
        return [s]


def build_document(results: Results, results_dir: Path, out_dir: Path) -> tuple[Document, list[Path]]:
    """The report document and the PNG figures written under ``out_dir/figures``."""
    b = _Builder(results, results_dir, out_dir)
    return b.build(), b.figures

