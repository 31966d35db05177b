//! A real driver and executor of one job, with the job's certificates: whoever lacks them
//! (a plain client, another job's certificates) is refused by both, and a certificate of
//! the job whose role may not call a method is refused before the method runs.
use std::time::Duration;

use arrow_flight::Ticket;
use arrow_flight::flight_service_client::FlightServiceClient;
use kiln_api::LocationPolicy;
use kiln_api::rpc::JobStatusRequest;
use kiln_api::rpc::driver_client::DriverClient;
use kiln_api::tls::{self, JobCredentials, Role, TlsIdentity};
use tonic::Code;

use crate::driver::{Driver, DriverOptions, Progress};
use crate::worker::{ExecutorOptions, run_executor};

const SPEC: &str = r#"
inputs: [{name: t, format: csv, uri: "/nonexistent/"}]
steps: [{name: s, sql: "SELECT 1"}]
"#;

/// What a call to the driver's JobStatus, presenting `tls`, comes to.
async fn job_status(driver: &str, tls: Option<&TlsIdentity>) -> Code {
    let endpoint = tls::endpoint(driver, tls, Role::Driver)
        .unwrap()
        .timeout(Duration::from_secs(5));
    let Ok(channel) = endpoint.connect().await else {
        return Code::Unavailable;
    };
    match DriverClient::new(channel)
        .job_status(JobStatusRequest {
            token: "token".into(),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// What a block fetch from the executor at `address`, presenting `tls`, comes to.
async fn do_get(address: &str, tls: Option<&TlsIdentity>) -> Code {
    let endpoint = tls::endpoint(&format!("http://{address}"), tls, Role::Executor)
        .unwrap()
        .timeout(Duration::from_secs(5));
    let Ok(channel) = endpoint.connect().await else {
        return Code::Unavailable;
    };
    match FlightServiceClient::new(channel)
        .do_get(Ticket::new("no such block"))
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn strangers_are_refused_and_roles_keep_to_their_methods() {
    let spec = kiln_api::parse_job(SPEC).unwrap();
    let job = JobCredentials::issue("job").unwrap();
    let other = JobCredentials::issue("other").unwrap();
    let id = |c: &JobCredentials, role| c.identity(role).unwrap();
    let driver = Driver::start(
        &spec,
        DriverOptions {
            bind: "127.0.0.1:0".parse().unwrap(),
            token: Some("token".into()),
            heartbeat_timeout: Duration::from_secs(30),
            job_uid: None,
            epoch: 1,
            attach: Vec::new(),
            tls: Some(id(&job, Role::Driver)),
            locations: LocationPolicy::local(),
        },
    )
    .await
    .unwrap();
    let url = format!("http://{}", driver.address());
    let mut progress = driver.subscribe();
    let work = tempfile::tempdir().unwrap();
    let executor = tokio::spawn(run_executor(ExecutorOptions {
        driver: url.clone(),
        executor_id: "exec-0".into(),
        bind_host: "127.0.0.1".into(),
        port: 0,
        advertise_host: None,
        slots: Some(1),
        memory: Some(1 << 30),
        work_dir: work.path().to_path_buf(),
        token: "token".into(),
        faults: String::new(),
        tls: Some(id(&job, Role::Executor)),
        locations: LocationPolicy::local(),
    }));
    // The executor registered over TLS: its certificate was good for the driver.
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(Progress::ExecutorRegistered { address, .. }) = progress.recv().await {
                return address;
            }
        }
    })
    .await
    .expect("the executor registers");

    // The driver: only the job's operator may ask for progress.
    assert_eq!(
        job_status(&url, Some(&id(&job, Role::Operator))).await,
        Code::Ok
    );
    for (who, tls, refused) in [
        ("a plain client", None, None),
        (
            "another job's operator",
            Some(id(&other, Role::Operator)),
            None,
        ),
        (
            "the job's executor",
            Some(id(&job, Role::Executor)),
            Some(Code::PermissionDenied),
        ),
    ] {
        let code = job_status(&url, tls.as_ref()).await;
        match refused {
            Some(expected) => assert_eq!(code, expected, "{who}"),
            None => assert!(
                matches!(code, Code::Unavailable | Code::Unknown | Code::Internal),
                "{who} got {code:?} from the driver"
            ),
        }
    }

    // The executor's blocks: the job's driver and executors get past the guard (to the
    // handler, which finds the ticket names no block), nobody else does.
    for role in [Role::Driver, Role::Executor] {
        assert_eq!(
            do_get(&address, Some(&id(&job, role))).await,
            Code::InvalidArgument
        );
    }
    assert_eq!(
        do_get(&address, Some(&id(&job, Role::Operator))).await,
        Code::PermissionDenied
    );
    for (who, tls) in [
        ("a plain client", None),
        ("another job's executor", Some(id(&other, Role::Executor))),
    ] {
        let code = do_get(&address, tls.as_ref()).await;
        assert!(
            matches!(code, Code::Unavailable | Code::Unknown | Code::Internal),
            "{who} got {code:?} from the executor"
        );
    }
    executor.abort();
    driver.kill();
}
