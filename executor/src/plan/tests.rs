use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::physical_plan::{ExecutionPlan, Partitioning, displayable};
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use kiln_api::{JobSpec, OutputFormat};

use super::*;
use crate::session::session_config;
use crate::shuffle::{Location, ReadMode, ShuffleReaderExec, ShuffleWriterExec};

async fn context() -> SessionContext {
    let spec = JobSpec {
        shuffle_partitions: 4,
        ..Default::default()
    };
    let ctx = SessionContext::new_with_config(session_config(&spec));
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Utf8, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let part = |keys: &[&str]| {
        vec![
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(keys.to_vec())),
                    Arc::new(Int64Array::from_iter_values(0..keys.len() as i64)),
                ],
            )
            .unwrap(),
        ]
    };
    let table = MemTable::try_new(
        schema.clone(),
        vec![part(&["a", "b", "c"]), part(&["a", "d"]), part(&["e"])],
    )
    .unwrap();
    ctx.register_table("t", Arc::new(table)).unwrap();
    ctx
}

async fn physical(ctx: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
    ctx.sql(sql)
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap()
}

fn count_nodes<T: ExecutionPlan>(plan: &Arc<dyn ExecutionPlan>) -> usize {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut n = 0;
    plan.apply(|p| {
        if p.is::<T>() {
            n += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .unwrap();
    n
}

#[tokio::test]
async fn a_group_by_splits_at_its_shuffle() {
    let ctx = context().await;
    let plan = physical(&ctx, "SELECT k, sum(v) FROM t GROUP BY k").await;
    let stages = StagePlanner::new(4)
        .split(plan, &FinalOutput::Blocks)
        .unwrap();
    assert_eq!(stages.len(), 2, "{stages:#?}");
    let (map, reduce) = (&stages[0], &stages[1]);
    assert!(map.inputs.is_empty());
    assert_eq!(map.partitions, 3, "one map task per input partition");
    let writer = map.plan.downcast_ref::<ShuffleWriterExec>().unwrap();
    assert!(matches!(
        writer.partitioning(),
        Some(Partitioning::Hash(_, 4))
    ));
    assert_eq!(reduce.inputs, vec![map.id]);
    assert_eq!(
        reduce.partitions, 4,
        "one reduce task per shuffle partition"
    );
    assert_eq!(count_nodes::<ShuffleReaderExec>(&reduce.plan), 1);
    // no exchange is left inside a stage
    for s in &stages {
        let text = displayable(s.plan.as_ref()).indent(true).to_string();
        assert!(!text.contains("RepartitionExec"), "{text}");
        assert!(!text.contains("CoalescePartitionsExec"), "{text}");
    }
}

#[tokio::test]
async fn an_order_by_merges_in_one_final_task() {
    let ctx = context().await;
    let plan = physical(&ctx, "SELECT k, v FROM t ORDER BY v, k").await;
    let stages = StagePlanner::new(4)
        .split(
            plan,
            &FinalOutput::Sink {
                uri: "file:///tmp/out/".into(),
                format: OutputFormat::Csv,
            },
        )
        .unwrap();
    let last = stages.last().unwrap();
    assert_eq!(last.partitions, 1);
    assert!(last.plan.is::<SinkExec>());
    let readers: Vec<ReadMode> = {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        let mut v = Vec::new();
        last.plan
            .apply(|p| {
                if let Some(r) = p.downcast_ref::<ShuffleReaderExec>() {
                    v.push(r.mode());
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .unwrap();
        v
    };
    assert_eq!(readers, vec![ReadMode::PassThrough]);
    assert!(
        stages.windows(2).all(|w| w[0].id < w[1].id),
        "ids follow dependency order"
    );
}

#[tokio::test]
async fn stage_plans_round_trip_through_the_codec() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    let ctx = context().await;
    ctx.sql("SELECT * FROM t")
        .await
        .unwrap()
        .write_parquet(path.to_str().unwrap(), Default::default(), None)
        .await
        .unwrap();
    ctx.register_parquet("p", path.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    let plan = physical(
        &ctx,
        "SELECT k, count(*) AS n FROM p GROUP BY k ORDER BY n DESC",
    )
    .await;
    let stages = StagePlanner::new(4)
        .split(plan, &FinalOutput::Blocks)
        .unwrap();
    for stage in stages {
        assert_round_trips(&ctx, &stage);
    }
}

/// Resolves every reader of `stage` as the driver does before shipping it, sends the plan
/// through the codec and checks it arrives unchanged.
fn assert_round_trips(ctx: &SessionContext, stage: &Stage) {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    let resolved = stage
        .plan
        .clone()
        .transform_up(|node| {
            Ok(match node.downcast_ref::<ShuffleReaderExec>() {
                Some(r) => Transformed::yes(Arc::new(r.resolved(vec![
                    Location {
                        executor: "exec-0".into(),
                        address: "127.0.0.1:1".into(),
                    };
                    r.partitions()
                ])) as Arc<dyn ExecutionPlan>),
                None => Transformed::no(node),
            })
        })
        .unwrap()
        .data;
    let bytes = physical_plan_to_bytes_with_extension_codec(resolved.clone(), &KilnCodec).unwrap();
    let back =
        physical_plan_from_bytes_with_extension_codec(&bytes, &ctx.task_ctx(), &KilnCodec).unwrap();
    assert_eq!(
        displayable(back.as_ref()).indent(true).to_string(),
        displayable(resolved.as_ref()).indent(true).to_string(),
        "stage {} changed in transit",
        stage.id
    );
}

#[tokio::test]
async fn a_broadcast_join_reads_its_build_side_as_a_broadcast_and_keeps_it_in_transit() {
    let ctx = context().await;
    // Both sides are far below the broadcast threshold: the join collects its left side.
    let plan = physical(&ctx, "SELECT a.k, b.v FROM t a JOIN t b ON a.k = b.k").await;
    let stages = StagePlanner::new(4)
        .split(plan, &FinalOutput::Blocks)
        .unwrap();
    let mut broadcast = Vec::new();
    for stage in &stages {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        stage
            .plan
            .apply(|p| {
                if let Some(r) = p.downcast_ref::<ShuffleReaderExec>()
                    && r.mode() == ReadMode::Broadcast
                {
                    broadcast.push(stage.id);
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .unwrap();
        assert_round_trips(&ctx, stage);
    }
    assert_eq!(
        broadcast.len(),
        1,
        "one stage reads the build side as a broadcast: {stages:#?}"
    );
}
