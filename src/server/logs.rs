//! Log output batched in memory and written to stderr by a background thread.
//!
//! tracing's fmt layer writes each event with one `write` to an unbuffered
//! stderr: a syscall per admission, a few µs under load. Here events are
//! appended to a buffer and written out within [`DELAY`] of the first one, so
//! a busy server makes about ten writes a second instead of one per line.
//! Nothing is dropped: the buffer is unbounded between flushes except that a
//! writer flushes it itself past [`FLUSH_AT`], and [`Flush`] writes what is
//! left when `serve` returns.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long a line may wait in memory before it reaches stderr.
pub const DELAY: Duration = Duration::from_millis(100);
/// A writer that finds this much buffered writes it out itself, so a burst
/// of logging cannot grow the buffer without bound.
const FLUSH_AT: usize = 256 * 1024;

#[derive(Default)]
struct Shared {
    /// Where lines are appended.
    buf: Mutex<Vec<u8>>,
    /// The buffer being written out. Swapped with `buf` rather than
    /// replaced, so both keep their capacity: once warm, a flush allocates
    /// and frees nothing. (Taking the buffer and freeing it on the writer
    /// thread left mimalloc holding several MiB of cross-thread frees.)
    out: Mutex<Vec<u8>>,
    /// Signalled when the buffer stops being empty.
    pending: Condvar,
}

impl Shared {
    fn buf(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn flush(&self) {
        // Flushers queue on `out`, so chunks reach stderr in order.
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::swap(&mut *out, &mut *self.buf());
        let _ = io::stderr().lock().write_all(&out);
        out.clear();
        // A burst can leave a large buffer behind; do not keep it forever.
        if out.capacity() > 2 * FLUSH_AT {
            out.shrink_to(FLUSH_AT);
        }
    }
}

/// The `MakeWriter` given to tracing.
#[derive(Clone)]
pub struct Batched(Arc<Shared>);

/// Writes out what is buffered when dropped: hold it until the last line.
pub struct Flush(Arc<Shared>);

impl Drop for Flush {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// Starts the background writer.
pub fn batched() -> io::Result<(Batched, Flush)> {
    let shared = Arc::new(Shared::default());
    let bg = shared.clone();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            loop {
                let mut buf = bg.buf();
                while buf.is_empty() {
                    buf = bg.pending.wait(buf).unwrap_or_else(PoisonError::into_inner);
                }
                drop(buf);
                // Let lines accumulate: one write for everything logged meanwhile.
                std::thread::sleep(DELAY);
                bg.flush();
            }
        })?;
    Ok((Batched(shared.clone()), Flush(shared)))
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Batched {
    type Writer = Line<'a>;
    fn make_writer(&'a self) -> Line<'a> {
        Line(&self.0)
    }
}

/// One event's output (the fmt layer formats a whole line, then writes it).
pub struct Line<'a>(&'a Shared);

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut buf = self.0.buf();
        let was_empty = buf.is_empty();
        buf.extend_from_slice(bytes);
        let full = buf.len() >= FLUSH_AT;
        drop(buf);
        if full {
            self.0.flush();
        } else if was_empty {
            self.0.pending.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
