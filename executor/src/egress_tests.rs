use std::net::SocketAddr;

use kiln_api::LocationPolicy;

use super::screen;
use crate::Error;

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn refused_addresses_are_dropped_and_the_first_is_named() {
    let cluster = LocationPolicy::cluster();
    // A rebinding answer: one public address beside the metadata service.
    let (allowed, refused) = screen(
        &cluster,
        "data.example",
        addrs(&["169.254.169.254:0", "93.184.216.34:0", "[::1]:0"]),
    );
    assert_eq!(allowed, addrs(&["93.184.216.34:0"]));
    match refused {
        Some(Error::RefusedAddress { host, address, .. }) => {
            assert_eq!(host, "data.example");
            assert_eq!(address.to_string(), "169.254.169.254");
        }
        other => panic!("{other:?}"),
    }

    let (allowed, refused) = screen(&cluster, "data.example", addrs(&["[fd00:ec2::254]:0"]));
    assert!(allowed.is_empty());
    let message = refused.expect("refused").to_string();
    assert_eq!(
        message,
        "`data.example` resolves to fd00:ec2::254, which is refused: a cloud metadata service"
    );

    let local = LocationPolicy::local();
    let (allowed, refused) = screen(&local, "localhost", addrs(&["127.0.0.1:0", "[::1]:0"]));
    assert_eq!(allowed.len(), 2);
    assert!(refused.is_none());
}
