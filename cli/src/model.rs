//! `radfm export` and `radfm eval`: the finished model, through the same arguments and library
//! calls as `radfm-trainer export` and `eval` (this module links libtorch; it is left out of a
//! `radfm` built without the `torch` feature).

use anyhow::Result;
use radfm_trainer::commands::{EvalArgs, ExportArgs};

/// `radfm eval`: the trainer's arguments, and a table unless `--json`.
#[derive(clap::Args)]
pub struct EvalCommand {
    #[command(flatten)]
    args: EvalArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Exports and says what.
pub async fn export(a: ExportArgs) -> Result<()> {
    let card = a.run().await?;
    println!(
        "exported {} ({} parameters, step {}, loss {}) to {}",
        card.architecture,
        card.parameters,
        card.steps,
        card.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        a.out
    );
    Ok(())
}

/// Evaluates and prints the comparison.
pub async fn eval(a: EvalCommand) -> Result<()> {
    if a.args.zero_shot {
        return zero_shot(a).await;
    }
    let c = a.args.run().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(());
    }
    println!(
        "label {:?}: {} training and {} held-out samples",
        a.args.label, c.pretrained.train, c.pretrained.test
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>12}",
        "encoder", "k-NN AUROC", "k-NN bal.acc", "lin. AUROC", "lin. bal.acc"
    );
    for (name, r) in [
        ("pretrained", &c.pretrained),
        ("random init", &c.random_init),
    ] {
        println!(
            "{name:<12} {:>12.3} {:>12.3} {:>12.3} {:>12.3}",
            r.knn.auroc, r.knn.balanced_accuracy, r.linear.auroc, r.linear.balanced_accuracy
        );
    }
    Ok(())
}

/// The zero-shot table: per finding, AUROC of the pretrained and the random-init model overall
/// and per published cell; then recall@k both ways.
async fn zero_shot(a: EvalCommand) -> Result<()> {
    let z = a.args.run_zero_shot().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&z)?);
        return Ok(());
    }
    let ci = |e: &radfm_validation::stats::Estimate| {
        format!("{:.3} [{:.3}, {:.3}]", e.value, e.lo, e.hi)
    };
    println!("zero-shot on {} cases of {}", z.cases, z.dataset);
    println!(
        "{:<22} {:<24} {:>24} {:>24}",
        "finding", "cell", "pretrained AUROC", "random-init AUROC"
    );
    for t in &z.tasks {
        let rows = std::iter::once(("all cases".to_string(), &t.overall))
            .chain(t.subgroups.iter().map(|s| (s.name(), &s.result)));
        for (cell, p) in rows {
            println!(
                "{:<22} {:<24} {:>24} {:>24}",
                t.task,
                cell,
                ci(&p.candidate.auroc),
                ci(&p.baseline.auroc)
            );
        }
    }
    println!();
    println!(
        "{:<12} {:>6} {:>4} {:>14} {:>14} {:>8}",
        "retrieval", "pairs", "k", "image->text", "text->image", "chance"
    );
    for r in &z.retrieval {
        for (i2t, t2i) in r.image_to_text.iter().zip(&r.text_to_image) {
            println!(
                "{:<12} {:>6} {:>4} {:>14.3} {:>14.3} {:>8.3}",
                r.model, r.pairs, i2t.k, i2t.recall, t2i.recall, i2t.chance
            );
        }
    }
    Ok(())
}
