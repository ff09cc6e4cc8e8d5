//! A generation's life on its main thread: started (`run`), alone or under a supervisor
//! (`supervised`, the restart protocol's side), with its listen sockets (`listen`), its worker
//! threads and the drain (`running`), and the admin listener (`admin`). The top of the proxy:
//! it starts the workers (`crate::worker`), and nothing below imports it.

#[forbid(unsafe_code)]
pub mod admin;
#[forbid(unsafe_code)]
pub mod listen;
pub mod run;
#[forbid(unsafe_code)]
pub mod running;
pub mod supervised;
