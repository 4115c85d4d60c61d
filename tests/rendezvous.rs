//! Two processes of one host meet at one rendezvous address and leave with rank 0's id, as the
//! ranks of `train --gpus 2` do before they join NCCL. Needs no GPU: this test binary starts a
//! copy of itself as rank 1.

use std::process::Command;
use std::time::Duration;

use multitoken::distributed::rendezvous;

const ROLE: &str = "MULTITOKEN_TEST_RENDEZVOUS";
const TEST: &str = "two_processes_meet_at_one_rendezvous";

fn id() -> [u8; 128] {
    std::array::from_fn(|i| (i * 13 + 5) as u8)
}

#[test]
fn two_processes_meet_at_one_rendezvous() {
    if let Ok(address) = std::env::var(ROLE) {
        // the copy: rank 1 of 2, which must come back with rank 0's id
        let received = rendezvous(&address, 1, 2, None, Duration::from_secs(30)).unwrap();
        assert_eq!(received, id());
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let mut other =
        Command::new(std::env::current_exe().unwrap()).args(["--exact", TEST, "--test-threads", "1"]).env(ROLE, &address).spawn().unwrap();
    assert_eq!(rendezvous(&address, 0, 2, Some(id()), Duration::from_secs(30)).unwrap(), id());
    assert!(other.wait().unwrap().success(), "rank 1, another process, received the id");
}
