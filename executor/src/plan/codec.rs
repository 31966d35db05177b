//! Encodes Kiln's execution nodes inside datafusion-proto plans, so stage plans travel from
//! the driver to executors as bytes.
use std::sync::Arc;

use arrow::datatypes::Schema;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::physical_plan::from_proto::parse_protobuf_partitioning;
use datafusion_proto::physical_plan::to_proto::serialize_partitioning;
use datafusion_proto::physical_plan::{
    PhysicalExtensionCodec, PhysicalPlanDecodeContext, PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf;
use kiln_api::OutputFormat;
use prost::Message;

use super::SinkExec;
use crate::rpc::{self, plan_node::Node};
use crate::shuffle::{Location, ReadMode, ShuffleReaderExec, ShuffleWriterExec};

/// The codec for [`ShuffleWriterExec`], [`ShuffleReaderExec`] and [`SinkExec`].
#[derive(Debug, Default)]
pub struct KilnCodec;

fn decode_err(e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Internal(format!("decoding a Kiln plan node: {e}"))
}

impl PhysicalExtensionCodec for KilnCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let node = rpc::PlanNode::decode(buf)
            .map_err(decode_err)?
            .node
            .ok_or_else(|| decode_err("empty node"))?;
        let input = || {
            inputs
                .first()
                .cloned()
                .ok_or_else(|| decode_err("missing input"))
        };
        Ok(match node {
            Node::Writer(w) => {
                let input = input()?;
                let partitioning = match w.partitioning {
                    Some(bytes) => {
                        let proto =
                            protobuf::Partitioning::decode(bytes.as_slice()).map_err(decode_err)?;
                        let decode_ctx = PhysicalPlanDecodeContext::new(ctx, self);
                        parse_protobuf_partitioning(
                            Some(&proto),
                            &decode_ctx,
                            input.schema().as_ref(),
                            proto_converter,
                        )?
                    }
                    None => None,
                };
                Arc::new(ShuffleWriterExec::new(input, w.stage, partitioning))
            }
            Node::Reader(r) => {
                let proto = protobuf::Schema::decode(r.schema.as_slice()).map_err(decode_err)?;
                let schema = Schema::try_from(&proto)?;
                let mode = match (r.pass_through, r.broadcast) {
                    (true, true) => ReadMode::Broadcast,
                    (true, false) => ReadMode::PassThrough,
                    (false, _) => ReadMode::Hash,
                };
                let locations = r.resolved.then(|| {
                    r.locations
                        .into_iter()
                        .map(|l| Location {
                            executor: l.executor,
                            address: l.address,
                        })
                        .collect()
                });
                Arc::new(ShuffleReaderExec::new(
                    r.stage,
                    Arc::new(schema),
                    mode,
                    r.partitions as usize,
                    locations,
                ))
            }
            Node::Sink(s) => {
                let format = match s.format.as_str() {
                    "parquet" => OutputFormat::Parquet,
                    "csv" => OutputFormat::Csv,
                    "json" => OutputFormat::Json,
                    other => return Err(decode_err(format!("unknown output format {other}"))),
                };
                Arc::new(SinkExec::new(input()?, s.uri, format))
            }
        })
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<()> {
        let encoded = if let Some(w) = node.downcast_ref::<ShuffleWriterExec>() {
            let partitioning = w
                .partitioning()
                .map(|p| serialize_partitioning(p, self, proto_converter))
                .transpose()?
                .map(|p| p.encode_to_vec());
            Node::Writer(rpc::ShuffleWriterNode {
                stage: w.stage(),
                partitioning,
            })
        } else if let Some(r) = node.downcast_ref::<ShuffleReaderExec>() {
            let schema = protobuf::Schema::try_from(r.schema().as_ref())?;
            Node::Reader(rpc::ShuffleReaderNode {
                stage: r.stage(),
                schema: schema.encode_to_vec(),
                pass_through: r.mode() != ReadMode::Hash,
                broadcast: r.mode() == ReadMode::Broadcast,
                partitions: r.partitions() as u32,
                resolved: r.locations().is_some(),
                locations: r
                    .locations()
                    .unwrap_or_default()
                    .iter()
                    .map(|l| rpc::BlockLocation {
                        executor: l.executor.clone(),
                        address: l.address.clone(),
                    })
                    .collect(),
            })
        } else if let Some(s) = node.downcast_ref::<SinkExec>() {
            Node::Sink(rpc::SinkNode {
                uri: s.uri().to_string(),
                format: s.format().extension().to_string(),
            })
        } else {
            return Err(DataFusionError::NotImplemented(format!(
                "Kiln cannot ship the plan node {}",
                node.name()
            )));
        };
        rpc::PlanNode {
            node: Some(encoded),
        }
        .encode(buf)
        .map_err(|e| DataFusionError::Internal(format!("encoding a Kiln plan node: {e}")))
    }
}
