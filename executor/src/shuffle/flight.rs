//! Blocks over Arrow Flight: each executor serves its block store with `do_get` (the ticket
//! names the block); readers and the driver fetch with [`PeerClients`].
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use datafusion::common::runtime::SpawnedTask;
use datafusion::execution::memory_pool::MemoryReservation;
use datafusion::physical_plan::metrics::Count;
use futures::{Stream, StreamExt, TryStreamExt};
use kiln_api::tls::{self, Role, TlsIdentity};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::blocks::{BlockId, BlockStore};
use crate::{Error, Result};

type BoxedFlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Flight action a replacement driver sends an executor to take it over.
pub const ATTACH_ACTION: &str = "attach";

/// A replacement driver asking an executor to follow it (the body of [`ATTACH_ACTION`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttachRequest {
    /// The new driver's control service, `http://host:port`.
    pub driver: String,
    /// Its epoch: higher than that of any driver the executor followed before.
    pub epoch: u64,
    /// The per-job secret.
    pub token: String,
}

/// Decides on an attach request: `Ok` to follow the new driver, or why not.
pub type AttachHandler = Arc<dyn Fn(AttachRequest) -> Result<(), Status> + Send + Sync>;

/// Serves an executor's blocks, and hears replacement drivers out.
pub struct BlockFlightService {
    store: Arc<BlockStore>,
    attach: Option<AttachHandler>,
}

impl BlockFlightService {
    /// A service over `store`.
    pub fn new(store: Arc<BlockStore>) -> Self {
        Self {
            store,
            attach: None,
        }
    }

    /// Answers [`ATTACH_ACTION`] with `handler`.
    pub fn with_attach(mut self, handler: AttachHandler) -> Self {
        self.attach = Some(handler);
        self
    }
}

/// Asks the executor at `address` (`host:port`) to follow a new driver (this one, whose
/// identity is `tls`).
pub async fn send_attach(
    address: &str,
    request: &AttachRequest,
    tls: Option<&TlsIdentity>,
) -> Result<()> {
    let endpoint = tls::endpoint(&format!("http://{address}"), tls, Role::Executor)
        .map_err(|source| Error::Connect {
            address: address.into(),
            source,
        })?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|source| Error::Connect {
        address: address.into(),
        source,
    })?;
    let body = serde_json::to_vec(request).map_err(|e| Error::Driver(e.to_string()))?;
    let mut stream = FlightServiceClient::new(channel)
        .do_action(Action {
            r#type: ATTACH_ACTION.into(),
            body: body.into(),
        })
        .await
        .map_err(|s| Error::rpc("attach", s))?
        .into_inner();
    while stream
        .message()
        .await
        .map_err(|s| Error::rpc("attach", s))?
        .is_some()
    {}
    Ok(())
}

#[tonic::async_trait]
impl FlightService for BlockFlightService {
    type HandshakeStream = BoxedFlightStream<HandshakeResponse>;
    type ListFlightsStream = BoxedFlightStream<FlightInfo>;
    type DoGetStream = BoxedFlightStream<FlightData>;
    type DoPutStream = BoxedFlightStream<PutResult>;
    type DoActionStream = BoxedFlightStream<arrow_flight::Result>;
    type ListActionsStream = BoxedFlightStream<ActionType>;
    type DoExchangeStream = BoxedFlightStream<FlightData>;

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let ticket = request.into_inner().ticket;
        let id = BlockId::from_ticket(&ticket)
            .ok_or_else(|| Status::invalid_argument("ticket is not a block id"))?;
        // A spilled block is read back a batch at a time as the peer takes it.
        let (schema, batches) = self.store.stream(id).map_err(|e| match e {
            Error::BlockNotFound(_) => Status::not_found(e.to_string()),
            other => Status::internal(other.to_string()),
        })?;
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches.map_err(|e| FlightError::ExternalError(Box::new(e))))
            .map_err(|e| Status::internal(e.to_string()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("handshake"))
    }
    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented("list_flights"))
    }
    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented("get_flight_info"))
    }
    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("poll_flight_info"))
    }
    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("get_schema"))
    }
    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented("do_put"))
    }
    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        if action.r#type != ATTACH_ACTION {
            return Err(Status::unimplemented(format!(
                "unknown action `{}`",
                action.r#type
            )));
        }
        let handler = self
            .attach
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this executor cannot be taken over"))?;
        let attach: AttachRequest = serde_json::from_slice(&action.body)
            .map_err(|e| Status::invalid_argument(format!("attach request: {e}")))?;
        handler(attach)?;
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }
    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Err(Status::unimplemented("list_actions"))
    }
    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("do_exchange"))
    }
}

/// Flight clients to other executors, one channel per address.
#[derive(Default)]
pub struct PeerClients {
    channels: Mutex<HashMap<String, Channel>>,
    /// This process's identity, when the job's connections are TLS.
    tls: Option<TlsIdentity>,
}

impl PeerClients {
    /// Clients presenting `tls` (None: plain connections).
    pub fn new(tls: Option<TlsIdentity>) -> Self {
        PeerClients {
            channels: Mutex::default(),
            tls,
        }
    }

    fn channel(&self, address: &str) -> Result<Channel> {
        let mut channels = self.channels.lock().unwrap();
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let endpoint = tls::endpoint(
            &format!("http://{address}"),
            self.tls.as_ref(),
            Role::Executor,
        )
        .map_err(|source| Error::Connect {
            address: address.into(),
            source,
        })?
        .connect_timeout(std::time::Duration::from_secs(5))
        // A peer whose node vanished never closes its connections: HTTP/2 pings find
        // out, so a fetch from it fails (and is retried from lineage) within seconds.
        .http2_keep_alive_interval(std::time::Duration::from_secs(3))
        .keep_alive_timeout(std::time::Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(address.into(), channel.clone());
        Ok(channel)
    }

    /// Fetches one whole block from the executor at `address`, counting the bytes received.
    ///
    /// The transfer runs as a task of its own and reads the block to its end whatever the
    /// caller does meanwhile. A reader that opened several blocks and read them one after
    /// another would leave the others' data unread in HTTP/2 buffers; that data holds the
    /// connection's flow-control window, and the block being read, sharing the connection,
    /// would then wait forever. Dropping the returned future cancels the transfer.
    pub async fn fetch(
        &self,
        address: &str,
        id: BlockId,
        received: Count,
    ) -> Result<Vec<RecordBatch>> {
        Ok(self.transfer(address, id, received, None).await?.1)
    }

    /// Like [`PeerClients::fetch`], with the block's schema (known even for an empty block):
    /// what a copy of the block needs.
    pub async fn fetch_block(
        &self,
        address: &str,
        id: BlockId,
        received: Count,
    ) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        self.transfer(address, id, received, None).await
    }

    /// Like [`PeerClients::fetch`], counting each batch in `held` as it arrives while the
    /// memory pool has room (what it has no room for is held uncounted: forcing it in would
    /// leave the task's operators no memory even after they spilled).
    pub async fn fetch_held(
        &self,
        address: &str,
        id: BlockId,
        received: Count,
        held: Arc<MemoryReservation>,
    ) -> Result<Vec<RecordBatch>> {
        Ok(self.transfer(address, id, received, Some(held)).await?.1)
    }

    async fn transfer(
        &self,
        address: &str,
        id: BlockId,
        received: Count,
        held: Option<Arc<MemoryReservation>>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let channel = self.channel(address)?;
        let transfer = SpawnedTask::spawn(async move {
            let mut client =
                FlightServiceClient::new(channel).max_decoding_message_size(usize::MAX);
            let response = client
                .do_get(Ticket::new(id.ticket()))
                .await
                .map_err(|s| Error::rpc("do_get", s))?;
            let data = response.into_inner().map(move |d| {
                let d = d.map_err(FlightError::from)?;
                received.add(d.data_body.len() + d.data_header.len());
                Ok(d)
            });
            let mut stream = FlightRecordBatchStream::new_from_flight_data(data);
            let mut batches = Vec::new();
            while let Some(batch) = stream.try_next().await.map_err(Error::Flight)? {
                if let Some(held) = &held {
                    // A refusal is an answer, not an error: the batch is held uncounted, and
                    // the reader, seeing less counted than it received, stops fetching ahead.
                    held.try_grow(batch.get_array_memory_size()).ok();
                }
                batches.push(batch);
            }
            let schema = match stream.schema() {
                Some(schema) => schema.clone(),
                None => batches.first().map(RecordBatch::schema).ok_or_else(|| {
                    Error::Flight(FlightError::protocol("a block without a schema"))
                })?,
            };
            Ok((schema, batches))
        });
        transfer
            .join_unwind()
            .await
            .map_err(|e| Error::Cancelled(e.to_string()))?
    }
}
