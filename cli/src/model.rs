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
