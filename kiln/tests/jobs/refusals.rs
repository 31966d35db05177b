//! Steps that would change something instead of asking something are refused, naming the
//! step: DDL, DML (`COPY` and `INSERT` write files), and statements that change the session.
//! Each job runs its step against a real CSV input with `kiln run`; nothing is written.

use std::time::Duration;

use crate::common::{run_job_with, shared, tail};

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn steps_that_are_not_queries_are_refused_naming_the_step() {
    let _machine = shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).expect("input dir");
    std::fs::write(input.join("t.csv"), "k,v\na,1\nb,2\n").expect("write input");
    let copied = dir.path().join("copied.csv");
    let statements = [
        "CREATE TABLE made AS SELECT * FROM t".to_string(),
        "CREATE VIEW seen AS SELECT k FROM t".to_string(),
        "DROP TABLE t".to_string(),
        format!("COPY t TO '{}' STORED AS CSV", copied.display()),
        "INSERT INTO t VALUES ('c', 3)".to_string(),
        "SET datafusion.execution.target_partitions = 1".to_string(),
    ];
    for sql in &statements {
        let job = serde_yaml::to_value(serde_json::json!({
            "inputs": [{"name": "t", "format": "csv", "uri": format!("{}/", input.display())}],
            "steps": [{"name": "change", "sql": sql}],
        }))
        .expect("yaml");
        let run = run_job_with(dir.path(), &job, 1, &["--in-process"], TIMEOUT);
        let stderr = String::from_utf8_lossy(&run.output.stderr);
        assert!(!run.output.status.success(), "`{sql}` must be refused");
        assert!(
            stderr.contains("change") && stderr.contains("not supported"),
            "`{sql}`: the error names the step and says why: {}",
            tail(&stderr, 8)
        );
        assert!(!stderr.contains("panicked"), "{}", tail(&stderr, 8));
    }
    assert!(!copied.exists(), "COPY wrote nothing");
}
