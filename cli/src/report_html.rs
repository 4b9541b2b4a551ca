//! `radfm report`: the change-control record of one model version as a static HTML page with
//! inline SVG figures. It is what a clinician or a regulator reads: where the version came from
//! (lineage, data windows, training), how it did at every site (signed reports, forest plot of
//! candidate − production AUROC per site and subgroup, underdiagnosis and calibration per cell),
//! what the gate decided and why, and what the sites saw after it was deployed.

use std::fmt::Write as _;

use anyhow::Result;
use radfm_api::site_validation::PromotionPolicySpec;
use radfm_registry::{EventKind, Registry, Version};
use radfm_validation::gate::Decision;
use radfm_validation::monitor;
use radfm_validation::report::{self, Signed, SiteReport};
use radfm_validation::stats::{CellBias, Estimate};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn lineage_svg(chain: &[Version]) -> String {
    let (w, h, gap) = (170.0, 64.0, 40.0);
    let width = chain.len() as f64 * (w + gap) + 20.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="lineage-graph" width="{width}" height="{}" role="img" aria-label="lineage">"#,
        h + 20.0
    );
    s.push_str(r##"<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>"##);
    for (i, v) in chain.iter().rev().enumerate() {
        let x = 10.0 + i as f64 * (w + gap);
        let _ = write!(
            s,
            r##"<rect x="{x}" y="10" width="{w}" height="{h}" rx="6" fill="#eef3fb" stroke="#35649c"/><text x="{}" y="32" font-size="14" font-weight="bold">v{}</text><text x="{}" y="50" font-size="11">shards {}–{} ({} shards)</text><text x="{}" y="66" font-size="10">{}</text>"##,
            x + 8.0,
            v.version,
            x + 8.0,
            v.spec.data.first_seq,
            v.spec.data.last_seq,
            v.spec.data.shards.len(),
            x + 8.0,
            esc(v.spec.job_name.as_deref().unwrap_or("registered by hand"))
        );
        if i + 1 < chain.len() {
            let _ = write!(
                s,
                r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#555" marker-end="url(#arrow)"/>"##,
                x + w,
                10.0 + h / 2.0,
                x + w + gap - 2.0,
                10.0 + h / 2.0
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// Training loss curves of every version of the lineage (from each model card's loss history),
/// one colour per version, x = optimizer step of that version's run.
fn loss_svg(chain: &[Version]) -> String {
    let curves: Vec<(u64, Vec<(f64, f64)>)> = chain
        .iter()
        .rev()
        .filter_map(|v| {
            let points: Vec<(f64, f64)> = v
                .spec
                .config
                .get("loss_history")?
                .as_array()?
                .iter()
                .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                .filter(|p| p.1.is_finite())
                .collect();
            (!points.is_empty()).then_some((v.version, points))
        })
        .collect();
    if curves.is_empty() {
        return "<p>No loss history recorded.</p>".into();
    }
    let all = curves.iter().flat_map(|c| c.1.iter());
    let (max_x, lo, hi) = all.fold((1.0f64, f64::MAX, f64::MIN), |(mx, lo, hi), p| {
        (mx.max(p.0), lo.min(p.1), hi.max(p.1))
    });
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let (w, h, left, bottom) = (520.0, 220.0, 50.0, 30.0);
    let x = |s: f64| left + s / max_x * (w - left - 20.0);
    let y = |l: f64| 10.0 + (hi - l) / (hi - lo) * (h - bottom - 10.0);
    let colors = [
        "#35649c", "#c0392b", "#1e6b3a", "#b9770e", "#6c3483", "#117a65",
    ];
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="loss-plot" width="{w}" height="{h}" role="img" aria-label="training loss by step, per version">"#
    );
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#999"/><line x1="{left}" y1="10" x2="{left}" y2="{0}" stroke="#999"/><text x="{left}" y="{2}" font-size="10">step 0</text><text x="{3}" y="{2}" font-size="10" text-anchor="end">step {max_x}</text><text x="4" y="14" font-size="10">{hi:.3}</text><text x="4" y="{0}" font-size="10">{lo:.3}</text>"##,
        h - bottom,
        w - 20.0,
        h - bottom + 14.0,
        w - 20.0
    );
    for (i, (version, points)) in curves.iter().enumerate() {
        let c = colors[i % colors.len()];
        let line: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
            .collect();
        let _ = write!(
            s,
            r##"<polyline points="{}" fill="none" stroke="{c}" stroke-width="1.5"/><text x="{}" y="{}" font-size="11" fill="{c}">v{version}</text>"##,
            line.join(" "),
            w - 60.0,
            20.0 + 14.0 * i as f64
        );
    }
    s.push_str("</svg>");
    s
}

fn forest_svg(reports: &[SiteReport], task: &str, margin: Option<f64>) -> String {
    let mut rows: Vec<(String, f64, f64, f64)> = Vec::new();
    for r in reports {
        for t in r.tasks.iter().filter(|t| t.task == task) {
            let d = &t.overall.delta_auroc;
            rows.push((
                format!("{} · all ({})", r.site, t.overall.n),
                d.value,
                d.lo,
                d.hi,
            ));
            for s in &t.subgroups {
                let d = &s.result.delta_auroc;
                rows.push((
                    format!("{} · {} ({})", r.site, s.name(), s.result.n),
                    d.value,
                    d.lo,
                    d.hi,
                ));
            }
        }
    }
    if rows.is_empty() {
        return "<p>No accepted site report yet.</p>".into();
    }
    let (label_w, plot_w, row_h) = (240.0, 360.0, 20.0);
    let lo = rows
        .iter()
        .map(|r| r.2)
        .fold(-0.1f64, f64::min)
        .min(-margin.unwrap_or(0.0) - 0.02);
    let hi = rows.iter().map(|r| r.3).fold(0.1f64, f64::max);
    let xs = |v: f64| label_w + (v - lo) / (hi - lo) * plot_w;
    let height = rows.len() as f64 * row_h + 40.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="forest-plot" width="{}" height="{height}" role="img" aria-label="candidate minus production AUROC with 95% CI">"#,
        label_w + plot_w + 20.0
    );
    let _ = write!(
        s,
        r##"<line x1="{0:.1}" y1="5" x2="{0:.1}" y2="{1}" stroke="#999"/><text x="{0:.1}" y="{2}" font-size="10" text-anchor="middle">0</text>"##,
        xs(0.0),
        height - 25.0,
        height - 12.0
    );
    if let Some(m) = margin {
        let _ = write!(
            s,
            r##"<line x1="{0:.1}" y1="5" x2="{0:.1}" y2="{1}" stroke="#c0392b" stroke-dasharray="4 3"/><text x="{0:.1}" y="{2}" font-size="10" text-anchor="middle" fill="#c0392b">−δ = {3:.3}</text>"##,
            xs(-m),
            height - 25.0,
            height - 2.0,
            -m
        );
    }
    for (i, (label, v, l, h)) in rows.iter().enumerate() {
        let y = 15.0 + i as f64 * row_h;
        let bad = margin.is_some_and(|m| *l < -m);
        let color = if bad { "#c0392b" } else { "#1e6b3a" };
        let _ = write!(
            s,
            r##"<text x="4" y="{:.1}" font-size="11">{}</text><line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2"/><rect x="{:.1}" y="{:.1}" width="6" height="6" fill="{color}"><title>{v:+.3} [{l:+.3}, {h:+.3}]</title></rect>"##,
            y + 4.0,
            esc(label),
            xs(*l),
            xs(*h),
            xs(*v) - 3.0,
            y - 3.0
        );
    }
    s.push_str("</svg>");
    s
}

/// Renders the record of `model` at `version` (number or alias; default: the newest): the
/// header, then one section each for lineage, site validation, the gate and the history.
pub async fn render(
    registry: &str,
    model: &str,
    version: Option<&str>,
    policy: Option<&PromotionPolicySpec>,
) -> Result<String> {
    let reg = Registry::open(registry)?;
    let v = match version {
        Some(v) => reg.resolve(model, v).await?,
        None => reg
            .versions(model)
            .await?
            .last()
            .map(|v| v.version)
            .ok_or_else(|| anyhow::anyhow!("{model} has no versions in {registry}"))?,
    };
    let chain = reg.lineage(model, v).await?;
    let log = reg.events(model).await?;
    let mut h = String::new();
    header(&mut h, model, v, &chain[0], &log);
    lineage_section(&mut h, &chain);
    let stored = reg.reports(model, v).await?;
    sites_section(&mut h, v, &stored, policy);
    h.push_str("<section id=\"gate\"><h2>Promotion gate</h2>");
    if let Some(p) = policy {
        gate_rules(&mut h, p);
    }
    let decided = decision_about(&reg, model, v, &log).await?;
    decision(&mut h, decided);
    h.push_str("</section>");
    let looks = reg.monitor_reports(model, v).await?;
    monitoring_section(&mut h, model, v, &looks, policy);
    history_section(&mut h, &log);
    Ok(h)
}

fn header(
    h: &mut String,
    model: &str,
    v: u64,
    this: &radfm_registry::Version,
    log: &[radfm_registry::Event],
) {
    let aliases = radfm_registry::aliases_of(log);
    let alias_text: Vec<String> = aliases.iter().map(|(a, t)| format!("{a} → v{t}")).collect();
    let _ = write!(
        h,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"/><title>radfm change-control record: {m} v{v}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}.Promote{{color:#1e6b3a}}.Reject{{color:#c0392b}}.Rollback{{color:#c0392b}}.HoldForReview{{color:#b9770e}}code{{font-size:12px}}.harm{{background:#fadbd8;font-weight:bold}}</style>
</head><body>
<h1>Change-control record: {m} v{v}</h1>
<p>Registered {created} by {by}; code version {code}; weights <code>{sha}</code>. Aliases: {aliases}.</p>
"#,
        m = esc(model),
        created = esc(&this.created),
        by = esc(&this.by),
        code = esc(&this.spec.code_version),
        sha = esc(&this.spec.weights_sha256),
        aliases = esc(&alias_text.join(", ")),
    );
}

fn lineage_section(h: &mut String, chain: &[radfm_registry::Version]) {
    let _ = write!(
        h,
        "<section id=\"lineage\"><h2>Lineage</h2>{}<table><tr><th>Version</th><th>Parent</th><th>TrainingJob</th><th>Data window</th><th>Shards</th><th>Replayed</th><th>Final loss</th><th>Steps</th><th>Why it exists</th></tr>",
        lineage_svg(chain)
    );
    for c in chain {
        let metric = |name: &str, digits: usize| {
            c.spec
                .metrics
                .get(name)
                .map_or("—".into(), |x| format!("{x:.digits$}"))
        };
        let _ = write!(
            h,
            "<tr><td>v{}</td><td>{}</td><td>{}</td><td><code>{}</code> {}–{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.version,
            c.spec.parent.map_or("—".into(), |p| format!("v{p}")),
            esc(c.spec.job_name.as_deref().unwrap_or("—")),
            esc(&c.spec.data.index_uri),
            c.spec.data.first_seq,
            c.spec.data.last_seq,
            c.spec.data.shards.len(),
            c.spec.data.replayed.len(),
            metric("final_loss", 4),
            metric("steps", 0),
            why_it_exists(c),
        );
    }
    let _ = write!(
        h,
        "</table><h3>Training loss across the lineage</h3>{}",
        loss_svg(chain)
    );
    for c in chain {
        if let Some(f) = &c.spec.federated {
            federated_table(h, c.version, f);
        }
    }
    h.push_str("</section>");
}

/// What made a version: the continual-training trigger (with each drifting site's evidence),
/// federated training, or a registration by hand.
fn why_it_exists(v: &radfm_registry::Version) -> String {
    if let Some(t) = &v.spec.trigger {
        let mut out = format!(
            "<span class=\"trigger\" data-trigger=\"{:?}\">{}</span>",
            t.kind,
            esc(&t.summary)
        );
        if !t.drift.is_empty() {
            out.push_str("<ul class=\"drift\">");
            for d in &t.drift {
                let _ = write!(
                    out,
                    "<li data-site=\"{site}\">Drift at {site} ({model} v{version}, signed {created}): {evidence} <code>{report}</code></li>",
                    site = esc(&d.site),
                    model = esc(&d.model),
                    version = d.version,
                    created = esc(&d.created),
                    evidence = esc(&d.evidence.join("; ")),
                    report = esc(&d.report),
                );
            }
            out.push_str("</ul>");
        }
        return out;
    }
    if v.spec.federated.is_some() {
        return "federated training".into();
    }
    "registered by hand".into()
}

/// A federated version's rounds: every admitted contribution and every refused one with why.
fn federated_table(h: &mut String, version: u64, f: &radfm_registry::federated::FederatedLineage) {
    let _ = write!(
        h,
        "<h3 id=\"federated-v{version}\">Federated rounds of v{version}</h3><p>Federation <code>{}</code> through <code>{}</code>; hub key <code>{}</code>; result <code>{}</code>.</p>\
         <table class=\"federated\"><tr><th>Round</th><th>Site</th><th>Outcome</th><th>Samples</th><th>Steps</th><th>Update norm</th><th>Local loss</th><th>Update</th><th>Dataset index</th></tr>",
        esc(&f.federation),
        esc(&f.exchange),
        esc(&f.hub_key),
        esc(&f.result_digest)
    );
    for r in &f.rounds {
        for c in &r.admitted {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>admitted ({})</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
                r.round,
                esc(&c.site),
                esc(&r.aggregator),
                c.samples,
                c.steps,
                c.norm,
                c.local_loss,
                esc(&c.update_digest),
                esc(&c.dataset_index_digest)
            );
        }
        for x in &r.rejected {
            let _ = write!(
                h,
                "<tr class=\"rejected\"><td>{}</td><td>{}</td><td>refused: {} ({})</td><td colspan=\"6\"></td></tr>",
                r.round,
                esc(&x.site),
                esc(&x.reason),
                esc(&x.message)
            );
        }
    }
    h.push_str("</table>");
}

/// One stored report as a table row: (signature, key, cells), and the report where it counts.
fn site_row(
    v: u64,
    site: &str,
    bytes: &[u8],
    policy: Option<&PromotionPolicySpec>,
) -> (String, String, String, Option<SiteReport>) {
    let verified = serde_json::from_slice::<Signed>(bytes)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            report::verify(&s)
                .map(|r| (s, r))
                .map_err(|e| e.to_string())
        });
    let (s, r) = match verified {
        Ok(found) => found,
        Err(e) => {
            let cells = "<td colspan=\"4\">not counted</td>".to_string();
            return (format!("FAILED: {}", esc(&e)), "—".into(), cells, None);
        }
    };
    let trusted = policy.map(|p| {
        p.trusted_sites
            .iter()
            .any(|t| t.site == r.site && t.public_key == s.public_key)
    });
    let key = match trusted {
        Some(true) => "trusted".to_string(),
        Some(false) => "NOT trusted".to_string(),
        None => format!("{}…", &s.public_key[..16]),
    };
    let cells = format!(
        "<td>{}</td><td>v{}</td><td>{:.3}</td><td>{:+.2}</td>",
        r.cases,
        r.baseline,
        r.representation_drift.linear_cka,
        r.data_drift.standardized_mean_difference
    );
    let counts = trusted != Some(false) && r.site == site && r.candidate == v;
    ("verified".to_string(), key, cells, counts.then_some(r))
}

fn sites_section(
    h: &mut String,
    v: u64,
    stored: &[(String, String, Vec<u8>)],
    policy: Option<&PromotionPolicySpec>,
) {
    let mut accepted: Vec<SiteReport> = Vec::new();
    h.push_str("<section id=\"sites\"><h2>Site validation</h2><table><tr><th>Site</th><th>Signature</th><th>Key</th><th>Cases</th><th>Baseline</th><th>Representation drift (CKA)</th><th>Data drift (SMD)</th></tr>");
    for (site, uri, bytes) in stored {
        let (sig, key, row, counted) = site_row(v, site, bytes, policy);
        accepted.extend(counted);
        let _ = write!(
            h,
            "<tr><td title=\"{}\">{}</td><td class=\"signature\">{sig}</td><td>{key}</td>{row}</tr>",
            esc(uri),
            esc(site)
        );
    }
    h.push_str("</table>");
    let task = policy
        .map(|p| p.task.clone())
        .or_else(|| {
            accepted
                .first()
                .and_then(|r| r.tasks.first())
                .map(|t| t.task.clone())
        })
        .unwrap_or_default();
    let _ = write!(
        h,
        "<h3>Candidate − production AUROC, {} (95 % bootstrap CI)</h3>{}<p>Subgroups with fewer cases than each site's minimum cell size are suppressed at the site and appear nowhere.</p>",
        esc(&task),
        forest_svg(&accepted, &task, policy.map(|p| p.non_inferiority_margin))
    );
    bias_table(h, &accepted, &task, policy);
    h.push_str("</section>");
}

/// A cell's numbers as table cells, marked `harm` where the policy's limit is exceeded with
/// 95 % confidence.
fn bias_cells(
    bias: Option<&CellBias>,
    ece: Option<&Estimate>,
    p: Option<&PromotionPolicySpec>,
) -> String {
    let over = |e: &Estimate, limit: Option<f64>| match limit {
        Some(l) if e.lo > l => " class=\"harm\"",
        _ => "",
    };
    let ci = |e: &Estimate, sign: bool| match sign {
        true => format!("{:+.3} [{:+.3}, {:+.3}]", e.value, e.lo, e.hi),
        false => format!("{:.3} [{:.3}, {:.3}]", e.value, e.lo, e.hi),
    };
    let (fnr, gap) = match bias {
        Some(b) => (
            format!("<td>{:.3}</td>", b.false_negative_rate),
            format!(
                "<td{}>{}</td>",
                over(&b.fnr_gap, p.and_then(|p| p.max_false_negative_rate_gap)),
                ci(&b.fnr_gap, true)
            ),
        ),
        None => ("<td>—</td>".into(), "<td>—</td>".into()),
    };
    let ece = ece.map_or("<td>—</td>".into(), |e| {
        let limit = p.and_then(|p| p.max_calibration_error);
        format!("<td{}>{}</td>", over(e, limit), ci(e, false))
    });
    format!("{fnr}{gap}{ece}")
}

/// Underdiagnosis and calibration of the candidate at every site, per cell.
fn bias_table(h: &mut String, reports: &[SiteReport], task: &str, p: Option<&PromotionPolicySpec>) {
    h.push_str("<h3>Where the candidate could harm a group: underdiagnosis and calibration</h3><table id=\"bias\"><tr><th>Site</th><th>Cell</th><th>Cases</th><th>False-negative rate</th><th>Gap to all cases (95 % CI)</th><th>Calibration error (95 % CI)</th></tr>");
    for r in reports {
        for t in r.tasks.iter().filter(|t| t.task == task) {
            let all = bias_cells(None, t.calibration_error.as_ref(), p);
            let _ = write!(
                h,
                "<tr data-site=\"{0}\" data-cell=\"\"><td>{0}</td><td>all cases</td><td>{1}</td>{all}</tr>",
                esc(&r.site),
                t.overall.n
            );
            for c in &t.subgroups {
                let ece = c.bias.as_ref().map(|b| &b.calibration_error);
                let _ = write!(
                    h,
                    "<tr data-site=\"{0}\" data-cell=\"{1}\"><td>{0}</td><td>{1}</td><td>{2}</td>{3}</tr>",
                    esc(&r.site),
                    esc(&c.name()),
                    c.result.n,
                    bias_cells(c.bias.as_ref(), ece, p)
                );
            }
        }
    }
    h.push_str("</table><p>The false-negative rate is the share of a cell's positive cases the candidate misses at its operating point; a positive gap means the cell's disease is missed more often than on average (underdiagnosis). Cells marked are beyond the policy's limit with 95 % confidence. Intersections (<code>a=x&amp;b=y</code>) appear only where every cell of the crossed table is large enough.</p>");
}

/// Every site's latest signed look at the version after it was deployed.
fn monitoring_section(
    h: &mut String,
    model: &str,
    v: u64,
    looks: &[(String, String, Vec<u8>)],
    policy: Option<&PromotionPolicySpec>,
) {
    h.push_str("<section id=\"monitoring\"><h2>Monitoring after deployment</h2>");
    if looks.is_empty() {
        let _ = write!(h, "<p>No site has stored a look at v{v} yet.</p></section>");
        return;
    }
    h.push_str("<table><tr><th>Site</th><th>Signature</th><th>Key</th><th>Looked</th><th>Verdict</th><th>Evidence</th></tr>");
    for (site, uri, bytes) in looks {
        let row = match monitor::open_stored(bytes, site, model, v) {
            Ok((signed, r)) => {
                let trusted = policy.map(|p| {
                    p.trusted_sites.iter().any(|t| {
                        t.site == r.site && t.public_key.eq_ignore_ascii_case(&signed.public_key)
                    })
                });
                let key = match trusted {
                    Some(true) => "trusted",
                    Some(false) => "NOT trusted",
                    None => "not checked (no policy given)",
                };
                let verdict = if r.drifting { "drifting" } else { "stable" };
                let evidence = r.evidence().join("; ");
                format!(
                    "<td>verified</td><td>{key}</td><td>{}</td><td class=\"verdict\" data-verdict=\"{verdict}\">{verdict} (α = {})</td><td>{}</td>",
                    esc(&r.created),
                    r.alpha,
                    if evidence.is_empty() {
                        "—".into()
                    } else {
                        esc(&evidence)
                    }
                )
            }
            Err(e) => format!(
                "<td colspan=\"5\">FAILED: {} (not counted)</td>",
                esc(&e.to_string())
            ),
        };
        let _ = write!(
            h,
            "<tr data-site=\"{0}\"><td title=\"{1}\">{0}</td>{row}</tr>",
            esc(site),
            esc(uri)
        );
    }
    h.push_str("</table><p>Each site compares its recent cases with the data the version was validated on (embeddings, the task probe's scores, image metadata), with permutation tests adjusted together at the look's false-alarm level α.</p></section>");
}

fn limit(value: Option<f64>) -> String {
    value.map_or("not checked".into(), |v| format!("{v}"))
}

fn gate_rules(h: &mut String, p: &PromotionPolicySpec) {
    let sites: Vec<&str> = p.trusted_sites.iter().map(|t| t.site.as_str()).collect();
    let approval = if p.require_approval {
        "required"
    } else {
        "not required"
    };
    let _ = write!(
        h,
        "<table id=\"rules\"><tr><th>Rule</th><th>Value</th></tr><tr><td>Task</td><td>{}</td></tr><tr><td>Trusted sites</td><td>{}</td></tr><tr><td>Quorum</td><td>{}</td></tr><tr><td>Non-inferiority margin δ (lower CI of ΔAUROC ≥ −δ)</td><td>{}</td></tr><tr><td>Maximum worst-group gap</td><td>{}</td></tr><tr><td>Maximum underdiagnosis gap (lower CI of a cell's FNR − all cases' FNR)</td><td>{}</td></tr><tr><td>Maximum calibration error (lower CI)</td><td>{}</td></tr><tr><td>Required subgroups</td><td>{}</td></tr><tr><td>Human approval</td><td>{}</td></tr><tr><td>Allowed clock skew</td><td>{} s</td></tr></table>",
        esc(&p.task),
        esc(&sites.join(", ")),
        p.quorum,
        p.non_inferiority_margin,
        p.max_worst_group_gap,
        limit(p.max_false_negative_rate_gap),
        limit(p.max_calibration_error),
        esc(&p.required_subgroups.join(", ")),
        approval,
        p.max_clock_skew_seconds
    );
}

/// The newest event that stored a gate decision on version `v` (a promotion, a rejection, a
/// rollback away from it); else the newest note on it.
async fn decision_about<'a>(
    reg: &Registry,
    model: &str,
    v: u64,
    log: &'a [radfm_registry::Event],
) -> Result<Option<(&'a radfm_registry::Event, Option<Decision>)>> {
    let about_v: Vec<&radfm_registry::Event> = log
        .iter()
        .rev()
        .filter(|e| match &e.kind {
            EventKind::Note { version: Some(x) } => *x == v,
            EventKind::AliasMoved { to, from, .. } => *to == v || *from == Some(v),
            _ => false,
        })
        .collect();
    for e in &about_v {
        if let Some(d) = reg
            .decision(model, e.seq)
            .await?
            .and_then(|b| serde_json::from_slice::<Decision>(&b).ok())
            .filter(|d| d.candidate == v)
        {
            return Ok(Some((e, Some(d))));
        }
    }
    Ok(about_v
        .iter()
        .find(|e| matches!(e.kind, EventKind::Note { .. }))
        .map(|e| (*e, None)))
}

fn decision(h: &mut String, decided: Option<(&radfm_registry::Event, Option<Decision>)>) {
    let Some((e, decision)) = decided else {
        h.push_str("<div id=\"decision\"><p>No decision recorded yet.</p></div>");
        return;
    };
    let Some(d) = decision else {
        let _ = write!(
            h,
            "<div id=\"decision\"><p>Event {}: {}</p></div>",
            e.seq,
            esc(&e.reason)
        );
        return;
    };
    let _ = write!(
        h,
        "<div id=\"decision\"><p>Decision (event {}, {} by {}): <strong class=\"outcome {}\">{}</strong> v{} against v{}</p><ul id=\"reasons\">",
        e.seq,
        esc(&e.time),
        esc(&e.by),
        d.outcome.as_str(),
        d.outcome.as_str(),
        d.candidate,
        d.baseline
    );
    for r in &d.reasons {
        let _ = write!(
            h,
            "<li data-code=\"{}\" data-site=\"{}\" data-subgroup=\"{}\">{}</li>",
            esc(&r.code),
            esc(r.site.as_deref().unwrap_or("")),
            esc(r.subgroup.as_deref().unwrap_or("")),
            esc(&r.message)
        );
    }
    h.push_str("</ul></div>");
}

fn history_section(h: &mut String, log: &[radfm_registry::Event]) {
    h.push_str("<section id=\"history\"><h2>History</h2><table><tr><th>#</th><th>Time</th><th>By</th><th>What</th><th>Why</th></tr>");
    for e in log {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.seq,
            esc(&e.time),
            esc(&e.by),
            esc(&e.kind.to_string()),
            esc(&e.reason)
        );
    }
    h.push_str("</table></section></body></html>\n");
}
