//! The benchmark harness keeps working: every workload runs once, tiny, against a real node
//! and reports no errors. No timing is asserted.

use clap::Parser;
use flotilla_bench::{run_workload, BenchArgs};

use crate::support::NodeProc;

/// `BenchArgs` is a flattenable argument group; this is the smallest parser around it.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_workload_runs_without_errors() {
    let n = NodeProc::start().await;
    let url = n.url();
    for workload in [
        "push",
        "push-chunked",
        "pull",
        "mixed-pull",
        "manifest-get",
        "manifest-head",
        "tags-list",
        "catalog",
    ] {
        let args = Cli::try_parse_from([
            "flotilla-bench",
            &url,
            workload,
            "-c",
            "2",
            "-n",
            "6",
            "--size",
            "64KiB",
            "--chunk-size",
            "16KiB",
            "--mix",
            "16KiB:50,64KiB:50",
        ])
        .unwrap_or_else(|e| panic!("{workload}: {e}"))
        .args;
        let report = run_workload(args.to_config())
            .await
            .unwrap_or_else(|e| panic!("{workload}: {e}"));
        assert_eq!(report.errors, 0, "{workload}: {report:?}");
        assert!(report.requests >= 6, "{workload}: {report:?}");
    }
}
