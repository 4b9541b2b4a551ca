//! End-to-end tests of `radfm run` (the local runner) and of the CLI's error messages.

use std::process::Command;

use radfm_e2e::{radfm, repo_root, workspace_bin};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn sample() -> String {
    repo_root()
        .join("manifests/samples/trainingjob-local.yaml")
        .display()
        .to_string()
}

#[test]
fn radfm_run_of_the_local_sample_trains_two_workers_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("file://{}/cohort", dir.path().display());
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    let log = dir.path().join("progress.jsonl");
    let plot = dir.path().join("loss.svg");
    let args = |steps: &'static str| {
        vec![
            "run".to_string(),
            sample(),
            "--workers".into(),
            "2".into(),
            "--steps".into(),
            steps.into(),
            "--dataset".into(),
            data.clone(),
            "--checkpoint".into(),
            ckpt.clone(),
            "--synth-samples".into(),
            "256".into(),
            "--log".into(),
            log.display().to_string(),
            "--loss-plot".into(),
            plot.display().to_string(),
            "--quiet".into(),
        ]
    };
    let a: Vec<String> = args("8");
    let out = radfm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("has no shards; generating a synthetic cohort of 256 images"),
        "{err}"
    );
    assert!(
        text(&out.stdout).contains("mae-local finished"),
        "{}",
        text(&out.stdout)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["world"], 2);
    assert_eq!(lines.iter().filter(|l| l["event"] == "step").count(), 8);
    assert!(
        std::fs::read_to_string(&plot)
            .unwrap()
            .contains("<polyline")
    );

    // Running again with more steps resumes from the committed checkpoint of step 8.
    let a: Vec<String> = args("12");
    let out = radfm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("resuming from the checkpoint of step 8"),
        "{err}"
    );
    assert!(!err.contains("generating"), "{err}");
}

#[test]
fn a_permanent_worker_failure_fails_the_local_run_without_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("file://{}/cohort", dir.path().display());
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    let out = radfm(
        &[
            "run",
            &sample(),
            "--workers",
            "2",
            "--steps",
            "20",
            "--dataset",
            &data,
            "--checkpoint",
            &ckpt,
            "--synth-samples",
            "128",
            "--quiet",
        ],
        &[
            ("RADFM_FAULT", "nan-loss@2"),
            ("RADFM_MAX_NONFINITE_STEPS", "2"),
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("radfm run: mae-local failed after 1 attempt(s): worker 0 exited with code 66 (NonFiniteLoss): the failure policy says this cannot be retried (PermanentFailure)"),
        "{err}"
    );
}

/// Golden messages: what a person sees for common mistakes.
#[test]
fn bad_inputs_get_messages_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("job.yaml");
    let yaml = std::fs::read_to_string(sample()).unwrap();
    std::fs::write(&bad, yaml.replace("    steps: 300", "    stepz: 300")).unwrap();
    let bad = bad.display().to_string();
    let line = yaml.lines().position(|l| l.contains("steps: 300")).unwrap() + 1;
    let missing = dir.path().join("nope.yaml").display().to_string();
    // A PromotionPolicy file that the API server would refuse is refused by `radfm gate` too.
    let policy = dir.path().join("policy.yaml");
    let sample_policy = repo_root().join("manifests/samples/promotionpolicy.yaml");
    let policy_yaml = std::fs::read_to_string(sample_policy).unwrap();
    std::fs::write(&policy, policy_yaml.replace("quorum: 3", "quorum: 0")).unwrap();
    let policy = policy.display().to_string();
    for (args, expected) in [
        (
            vec!["gate", "--policy", policy.as_str()],
            format!(
                "Error: radfm gate\n\nCaused by:\n    0: {policy}\n    1: PromotionPolicy cxr-mae: 1 validation error(s):\n         - spec.quorum: quorum must be at least 1\n"
            ),
        ),
        (
            vec!["run", bad.as_str()],
            format!(
                "Error: radfm run\n\nCaused by:\n    {bad}: spec.training.stepz: unknown field (line {line})\n"
            ),
        ),
        (
            vec!["run", missing.as_str()],
            format!(
                "Error: radfm run\n\nCaused by:\n    0: reading {missing}\n    1: No such file or directory (os error 2)\n"
            ),
        ),
        (
            vec!["run", sample().leak(), "--workers", "0"],
            "Error: radfm run\n\nCaused by:\n    --workers must be at least 1, got 0\n".to_string(),
        ),
        (
            vec!["run", sample().leak(), "--dataset", "ftp://host/data"],
            "Error: radfm run\n\nCaused by:\n    0: dataset ftp://host/data\n    1: ftp://host/data: unsupported scheme \"ftp\": use file://, s3://, gs:// or az://\n".to_string(),
        ),
    ] {
        let out = radfm(&args, &[]);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(text(&out.stderr), expected, "{args:?}");
    }
}

#[test]
fn ctrl_c_checkpoints_and_stops_and_the_next_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("file://{}/cohort", dir.path().display());
    let ckpt = format!("file://{}/ckpt", dir.path().display());
    let log = dir.path().join("progress.jsonl");
    let args = [
        "run",
        &sample(),
        "--workers",
        "2",
        "--steps",
        "100000",
        "--dataset",
        &data,
        "--checkpoint",
        &ckpt,
        "--synth-samples",
        "128",
        "--quiet",
        "--log",
    ];
    let child = Command::new(workspace_bin("radfm").unwrap())
        .args(args)
        .arg(&log)
        .env("RADFM_THREADS", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for training to run (rank 0's step lines in the log), then Ctrl-C.
    let steps = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"event\":\"step\""))
            .count()
    };
    while steps(&log) < 3 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    let loc = radfm_data::store::Location::open(&ckpt).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let committed = rt
        .block_on(radfm_trainer::checkpoint::committed(&loc))
        .unwrap();
    let at = committed
        .first()
        .expect("a checkpoint written on Ctrl-C")
        .step;
    assert!(at >= 3, "{committed:?}");

    // Again, with a total just past the checkpoint (and without --log).
    let resume_steps = (at + 2).to_string();
    let mut again: Vec<&str> = args[..args.len() - 1].to_vec();
    again[5] = &resume_steps;
    let out = radfm(&again, &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("resuming from the checkpoint of step {at}")),
        "{err}"
    );
}

#[test]
fn an_unreachable_object_store_names_the_uri() {
    let out = radfm(
        &[
            "run",
            &sample(),
            "--dataset",
            "s3://radfm-missing/cohort",
            "--quiet",
        ],
        &[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("dataset s3://radfm-missing/cohort is unreachable or unreadable"),
        "{err}"
    );
    assert!(
        err.contains("s3://radfm-missing/cohort/index.json"),
        "{err}"
    );
}
