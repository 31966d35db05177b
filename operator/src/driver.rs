//! Talking to a job's driver over its control protocol: `ExecutorLost` when the operator
//! sees an executor pod go, `JobStatus` for the ComputeJob's progress. Behind a trait so the
//! reconciler's tests can stand in for the driver.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kiln_api::launch::DRIVER_PORT;
use kiln_api::rpc::driver_client::DriverClient;
use kiln_api::rpc::{
    DecommissionRequest, ExecutorLostRequest, JobStatusRequest, JobStatusResponse,
};
use kiln_api::tls::{self, Role};
use tonic::transport::Channel;

use crate::children::JobSecret;

use crate::podstate::LossReason;

/// A failed call to a driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverCallError {
    /// The driver's address is not a valid endpoint.
    #[error("bad driver address {address}: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    /// The call failed (driver unreachable, timed out, rejected the token).
    #[error("{call} on the driver at {address}: {source}")]
    Call {
        call: &'static str,
        address: String,
        source: tonic::Status,
    },
}

/// Wraps a failed call's status with the call and the driver's address.
fn call_failed(
    call: &'static str,
    driver_ip: &str,
) -> impl FnOnce(tonic::Status) -> DriverCallError {
    let address = driver_ip.to_string();
    move |source| DriverCallError::Call {
        call,
        address,
        source,
    }
}

/// The calls the operator makes to a driver.
#[async_trait::async_trait]
pub trait DriverApi: Send + Sync {
    /// Tells the driver at `driver_ip` that `executor` is gone; returns whether the driver
    /// still counted it live.
    async fn executor_lost(
        &self,
        driver_ip: &str,
        executor: &str,
        reason: LossReason,
        occurred_unix_ms: u64,
        secret: &JobSecret,
    ) -> Result<bool, DriverCallError>;

    /// The job's progress so far.
    async fn job_status(
        &self,
        driver_ip: &str,
        secret: &JobSecret,
    ) -> Result<JobStatusResponse, DriverCallError>;

    /// Gives the driver notice that `executor` is going (`cause` says why, given at
    /// `occurred_unix_ms`, 0 when unknown); returns whether the driver knew it (and drains
    /// it).
    async fn decommission(
        &self,
        driver_ip: &str,
        executor: &str,
        cause: &str,
        occurred_unix_ms: u64,
        secret: &JobSecret,
    ) -> Result<bool, DriverCallError>;
}

/// The real driver client: one lazily connected channel per driver address and job.
#[derive(Default)]
pub struct GrpcDriver {
    channels: Mutex<HashMap<String, Channel>>,
}

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

impl GrpcDriver {
    /// A client of the driver at `ip`, of the job whose Secret is `secret`: over TLS with
    /// the job's operator certificate when it has credentials. Channels are kept per
    /// driver address and job (an address may be another job's driver later).
    fn client(
        &self,
        ip: &str,
        secret: &JobSecret,
    ) -> Result<DriverClient<Channel>, DriverCallError> {
        let key = format!("{ip}/{}", secret.token);
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok(DriverClient::new(c.clone()));
        }
        let address = format!("http://{ip}:{DRIVER_PORT}");
        let tls = secret.operator_tls();
        let channel = tls::endpoint(&address, tls.as_ref(), Role::Driver)
            .map_err(|source| DriverCallError::Address { address, source })?
            .connect_timeout(Duration::from_secs(1))
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        // Drivers come and go with their jobs: keep the map small.
        if channels.len() > 256 {
            channels.clear();
        }
        channels.insert(key, channel.clone());
        Ok(DriverClient::new(channel))
    }
}

#[async_trait::async_trait]
impl DriverApi for GrpcDriver {
    async fn executor_lost(
        &self,
        driver_ip: &str,
        executor: &str,
        reason: LossReason,
        occurred_unix_ms: u64,
        secret: &JobSecret,
    ) -> Result<bool, DriverCallError> {
        let response = self
            .client(driver_ip, secret)?
            .executor_lost(ExecutorLostRequest {
                executor_id: executor.to_string(),
                reason: reason.as_str().to_string(),
                token: secret.token.clone(),
                occurred_unix_ms,
            })
            .await
            .map_err(call_failed("ExecutorLost", driver_ip))?;
        Ok(response.into_inner().known)
    }

    async fn job_status(
        &self,
        driver_ip: &str,
        secret: &JobSecret,
    ) -> Result<JobStatusResponse, DriverCallError> {
        let response = self
            .client(driver_ip, secret)?
            .job_status(JobStatusRequest {
                token: secret.token.clone(),
            })
            .await
            .map_err(call_failed("JobStatus", driver_ip))?;
        Ok(response.into_inner())
    }

    async fn decommission(
        &self,
        driver_ip: &str,
        executor: &str,
        cause: &str,
        occurred_unix_ms: u64,
        secret: &JobSecret,
    ) -> Result<bool, DriverCallError> {
        let response = self
            .client(driver_ip, secret)?
            .decommission(DecommissionRequest {
                executor_id: executor.to_string(),
                cause: cause.to_string(),
                token: secret.token.clone(),
                occurred_unix_ms,
            })
            .await
            .map_err(call_failed("Decommission", driver_ip))?;
        Ok(response.into_inner().known)
    }
}
