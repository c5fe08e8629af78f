//! A database connection owned by one OS thread. Callers hand it closures (awaited without
//! blocking a tokio worker) or queue items that it commits in batches (group commit).

use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, channel, sync_channel};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

/// The connection's thread has stopped (an earlier failure, or shutdown); names the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {0} thread has stopped or could not start; restart the operator")]
pub struct Closed(pub &'static str);

type Job<D> = Box<dyn FnOnce(&mut D) + Send>;

enum Work<D, B> {
    Run(Job<D>),
    Queued(B),
}

/// The sending half: unbounded for async callers (a full bounded queue would block their
/// worker), bounded where the producers are threads that should feel back-pressure.
enum Queue<D, B> {
    Unbounded(Sender<Work<D, B>>),
    Bounded(SyncSender<Work<D, B>>),
}

impl<D, B> Queue<D, B> {
    fn send(&self, w: Work<D, B>) -> bool {
        match self {
            Queue::Unbounded(tx) => tx.send(w).is_ok(),
            Queue::Bounded(tx) => tx.send(w).is_ok(),
        }
    }
}

/// Commits a batch of queued items on the connection.
pub type Commit<D, B> = Box<dyn FnMut(&mut D, Vec<B>) + Send>;

/// How queued items are committed: at most `max_weight` of them (by `weight`) per call.
pub struct Batching<D, B> {
    pub max_weight: usize,
    pub weight: fn(&B) -> usize,
    pub commit: Commit<D, B>,
}

/// No batching: the connection only runs closures.
pub enum NoBatch {}

/// A connection `D` on a thread of its own. `D` is made, used and dropped on that thread, so it
/// need not be `Send`. Dropping the handle finishes the queued work, then stops the thread.
pub struct DbThread<D, B = NoBatch> {
    name: &'static str,
    queue: Mutex<Option<Queue<D, B>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<D: 'static> DbThread<D, NoBatch> {
    /// Starts thread `name`, opens the connection there with `open`, and returns once it is
    /// open (or with `open`'s error).
    pub fn spawn<E: From<Closed> + Send + 'static>(name: &'static str, open: impl FnOnce() -> Result<D, E> + Send + 'static) -> Result<Self, E> {
        Self::start(name, None, open, None)
    }
}

impl<D: 'static, B: Send + 'static> DbThread<D, B> {
    /// Like [`DbThread::spawn`], and items queued with [`DbThread::queue`] are committed by
    /// `batching.commit`, everything queued at the time in one call. With `bound`, `queue`
    /// blocks while that many items wait.
    pub fn spawn_batched<E: From<Closed> + Send + 'static>(
        name: &'static str,
        bound: Option<usize>,
        open: impl FnOnce() -> Result<D, E> + Send + 'static,
        batching: Batching<D, B>,
    ) -> Result<Self, E> {
        Self::start(name, bound, open, Some(batching))
    }

    fn start<E: From<Closed> + Send + 'static>(
        name: &'static str,
        bound: Option<usize>,
        open: impl FnOnce() -> Result<D, E> + Send + 'static,
        batching: Option<Batching<D, B>>,
    ) -> Result<Self, E> {
        let (queue, rx) = match bound {
            None => {
                let (tx, rx) = channel();
                (Queue::Unbounded(tx), rx)
            }
            Some(n) => {
                let (tx, rx) = sync_channel(n);
                (Queue::Bounded(tx), rx)
            }
        };
        let (ready_tx, ready) = sync_channel::<Result<(), E>>(1);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut db = match open() {
                    Ok(db) => db,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                drop(ready_tx.send(Ok(())));
                serve(&mut db, rx, batching);
            })
            .map_err(|_| E::from(Closed(name)))?;
        match ready.recv() {
            Ok(Ok(())) => Ok(DbThread { name, queue: Mutex::new(Some(queue)), thread: Mutex::new(Some(thread)) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(E::from(Closed(name)))
            }
        }
    }

    fn send(&self, w: Work<D, B>) -> Result<(), Closed> {
        // Sending never panics while the lock is held, so a poisoned lock is safe to reuse.
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.as_ref().is_some_and(|q| q.send(w)) { Ok(()) } else { Err(Closed(self.name)) }
    }

    /// Runs `f` on the connection's thread and waits for it without blocking the caller's
    /// thread.
    pub async fn run<R: Send + 'static>(&self, f: impl FnOnce(&mut D) -> R + Send + 'static) -> Result<R, Closed> {
        let (reply, answer) = oneshot::channel();
        self.send(Work::Run(Box::new(move |db| drop(reply.send(f(db))))))?;
        answer.await.map_err(|_| Closed(self.name))
    }

    /// Runs `f` on the connection's thread and blocks until it returns (tests).
    #[cfg(test)]
    fn run_blocking<R: Send + 'static>(&self, f: impl FnOnce(&mut D) -> R + Send + 'static) -> Result<R, Closed> {
        let (reply, answer) = sync_channel(1);
        self.send(Work::Run(Box::new(move |db| drop(reply.send(f(db))))))?;
        answer.recv().map_err(|_| Closed(self.name))
    }

    /// Runs `f` on the connection's thread without waiting for it: for writes whose outcome
    /// the caller does not need (`f` reports its own failure).
    pub fn spawn_run(&self, f: impl FnOnce(&mut D) + Send + 'static) -> Result<(), Closed> {
        self.send(Work::Run(Box::new(f)))
    }

    /// Queues `item` for the next group commit.
    pub fn queue(&self, item: B) -> Result<(), Closed> {
        self.send(Work::Queued(item))
    }
}

impl<D, B> DbThread<D, B> {
    /// Stops taking work, lets the thread finish what is queued, and waits for it.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = t.join();
        }
    }
}

impl<D, B> Drop for DbThread<D, B> {
    fn drop(&mut self) {
        self.close();
    }
}

/// The thread's loop: closures run in order; queued items are taken together (stopping at a
/// closure, which then runs after their commit, so the order of the queue is kept).
fn serve<D, B>(db: &mut D, rx: Receiver<Work<D, B>>, mut batching: Option<Batching<D, B>>) {
    let mut next: Option<Work<D, B>> = None;
    loop {
        let work = match next.take() {
            Some(w) => w,
            None => match rx.recv() {
                Ok(w) => w,
                Err(_) => return,
            },
        };
        match work {
            Work::Run(f) => f(db),
            Work::Queued(first) => {
                let Some(b) = batching.as_mut() else { continue };
                let mut weight = (b.weight)(&first);
                let mut items = vec![first];
                while weight < b.max_weight {
                    match rx.try_recv() {
                        Ok(Work::Queued(item)) => {
                            weight += (b.weight)(&item);
                            items.push(item);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                (b.commit)(db, items);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Debug, PartialEq)]
    struct Failed(String);
    impl From<Closed> for Failed {
        fn from(c: Closed) -> Self {
            Failed(c.to_string())
        }
    }

    /// A "database" that records the batches it committed.
    type Log = Arc<Mutex<Vec<Vec<u32>>>>;

    fn batched(log: Log, max_weight: usize) -> DbThread<Vec<u32>, u32> {
        let batching = Batching {
            max_weight,
            weight: |_| 1,
            commit: Box::new(move |db: &mut Vec<u32>, items: Vec<u32>| {
                db.extend(&items);
                log.lock().unwrap().push(items);
            }),
        };
        DbThread::spawn_batched("test-db", None, || Ok::<_, Failed>(Vec::new()), batching).unwrap()
    }

    #[tokio::test]
    async fn closures_run_on_the_connections_own_thread() {
        let db = DbThread::spawn("test-db", || Ok::<_, Failed>(std::thread::current().id())).unwrap();
        let (owner, here) = (db.run(|owner| *owner).await.unwrap(), std::thread::current().id());
        assert_ne!(owner, here);
        assert_eq!(db.run(|_| std::thread::current().name().map(String::from)).await.unwrap().as_deref(), Some("test-db"));
    }

    #[test]
    fn an_open_that_fails_returns_its_error_and_leaves_no_thread() {
        let err = DbThread::<(), NoBatch>::spawn("test-db", || Err::<(), _>(Failed("no such file".into()))).err();
        assert_eq!(err, Some(Failed("no such file".into())));
    }

    /// Keeps the thread busy until the returned sender sends, so what is queued meanwhile waits.
    fn hold(db: &DbThread<Vec<u32>, u32>) -> SyncSender<()> {
        let (go, wait) = sync_channel::<()>(0);
        db.send(Work::Run(Box::new(move |_| wait.recv().unwrap()))).unwrap();
        go
    }

    #[test]
    fn items_queued_while_the_thread_is_busy_commit_together_and_in_order() {
        let log = Log::default();
        let db = batched(log.clone(), 100);
        let go = hold(&db);
        for i in 0..=5 {
            db.queue(i).unwrap();
        }
        go.send(()).unwrap();
        assert_eq!(db.run_blocking(|d: &mut Vec<u32>| d.clone()).unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(*log.lock().unwrap(), vec![vec![0, 1, 2, 3, 4, 5]], "one commit for the six queued");
    }

    #[test]
    fn a_batch_stops_at_its_weight_and_at_a_closure() {
        let log = Log::default();
        let db = batched(log.clone(), 2);
        let go = hold(&db);
        for i in 1..=3 {
            db.queue(i).unwrap();
        }
        let between = db.send(Work::Run(Box::new(|d: &mut Vec<u32>| d.push(99))));
        db.queue(4).unwrap();
        go.send(()).unwrap();
        between.unwrap();
        assert_eq!(db.run_blocking(|d: &mut Vec<u32>| d.clone()).unwrap(), vec![1, 2, 3, 99, 4]);
        assert_eq!(*log.lock().unwrap(), vec![vec![1, 2], vec![3], vec![4]]);
    }

    #[test]
    fn work_handed_over_without_waiting_runs_in_order() {
        let db = batched(Log::default(), 100);
        db.spawn_run(|d| d.push(7)).unwrap();
        db.queue(8).unwrap();
        assert_eq!(db.run_blocking(|d: &mut Vec<u32>| d.clone()).unwrap(), vec![7, 8]);
    }

    #[tokio::test]
    async fn a_closed_connection_says_which_thread_stopped() {
        let db = DbThread::spawn("test-db", || Ok::<_, Failed>(())).unwrap();
        db.close();
        assert_eq!(db.run(|_| ()).await, Err(Closed("test-db")));
        assert_eq!(Closed("test-db").to_string(), "the test-db thread has stopped or could not start; restart the operator");
    }

    #[test]
    fn dropping_the_handle_finishes_queued_work_first() {
        let log = Log::default();
        let db = batched(log.clone(), 100);
        for i in 0..100 {
            db.queue(i).unwrap();
        }
        drop(db);
        assert_eq!(log.lock().unwrap().iter().flatten().count(), 100);
    }
}
