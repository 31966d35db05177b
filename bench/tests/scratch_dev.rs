// Temporary: validates example SQL on single-process DataFusion. Deleted before hand-off.
#[path = "../../kiln/src/tpch.rs"]
#[allow(dead_code)]
mod tpch;

use std::sync::Arc;
use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::prelude::*;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[tokio::test(flavor = "multi_thread")]
async fn example_sql() {
    let ex = root().join("examples");
    let ctx = SessionContext::new();
    // wordcount
    let mut lines = Vec::new();
    for e in std::fs::read_dir(ex.join("wordcount/corpus")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "txt") {
            lines.extend(std::fs::read_to_string(&p).unwrap().lines().map(String::from));
        }
    }
    let schema = Arc::new(Schema::new(vec![Field::new("line", DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(lines))]).unwrap();
    ctx.register_table("lines", Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap())).unwrap();
    let job: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(ex.join("wordcount/job.yaml")).unwrap()).unwrap();
    run_steps(&ctx, &job).await;

    let opts = CsvReadOptions::new().delimiter(b'\t').file_extension(".tsv").has_header(true);
    ctx.register_csv("customers", ex.join("tsv-join/customers.tsv").to_str().unwrap(), opts.clone()).await.unwrap();
    ctx.register_csv("orders", ex.join("tsv-join/orders.tsv").to_str().unwrap(), opts).await.unwrap();
    let job: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(ex.join("tsv-join/job.yaml")).unwrap()).unwrap();
    run_steps(&ctx, &job).await;

    ctx.register_csv("slices", &format!("{}/", ex.join("pi/slices").display()), CsvReadOptions::new()).await.unwrap();
    let job: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(ex.join("pi/job.yaml")).unwrap()).unwrap();
    run_steps(&ctx, &job).await;
}

async fn run_steps(ctx: &SessionContext, job: &serde_yaml::Value) {
    for step in job["steps"].as_sequence().unwrap() {
        let name = step["name"].as_str().unwrap();
        let sql = step["sql"].as_str().unwrap();
        let t = std::time::Instant::now();
        let df = ctx.sql(sql).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let batches = df.clone().collect().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        println!("step {name}: {rows} rows in {:?}", t.elapsed());
        println!("{}", datafusion::arrow::util::pretty::pretty_format_batches(&batches[..batches.len().min(1)]).unwrap().to_string().lines().take(25).collect::<Vec<_>>().join("\n"));
        ctx.register_table(name, df.into_view()).unwrap();
    }
}
