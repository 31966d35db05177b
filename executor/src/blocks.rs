//! The executor's block store: shuffle outputs and cached partitions, kept in memory as Arrow
//! record batches within a byte budget; the least recently used segments move to local disk
//! (Arrow IPC files) when the budget is exceeded.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use crate::{Error, Result};

/// One block: the rows map task `map` of `stage` produced for reduce partition `reduce`
/// (pass-through and cached outputs use `reduce = 0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId {
    /// Stage id, unique within a job.
    pub stage: u32,
    /// Partition of the task that wrote it.
    pub map: u32,
    /// Partition of the consumer that reads it.
    pub reduce: u32,
}

impl BlockId {
    /// A block id.
    pub fn new(stage: u32, map: u32, reduce: u32) -> Self {
        Self { stage, map, reduce }
    }

    /// This executor's copy of pass-through block `(stage, map, 0)` of another executor,
    /// fetched once for all the tasks here that read it whole (broadcast reads). Its reduce
    /// partition is one no shuffle has, so it never meets a block of its own.
    pub fn replica(&self) -> Self {
        Self::new(self.stage, self.map, u32::MAX)
    }

    /// The Flight ticket naming this block.
    pub fn ticket(&self) -> String {
        format!("{}/{}/{}", self.stage, self.map, self.reduce)
    }

    /// Parses a Flight ticket.
    pub fn from_ticket(t: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(t).ok()?;
        let mut it = s.split('/').map(|p| p.parse::<u32>());
        let id = Self::new(it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?);
        it.next().is_none().then_some(id)
    }
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.stage, self.map, self.reduce)
    }
}

enum Data {
    Memory(Vec<RecordBatch>),
    /// Being written to `PathBuf`: still served (and counted) from memory until the write
    /// succeeded, so a failed write (a full disk) loses nothing.
    Writing(Vec<RecordBatch>, PathBuf),
    Disk(PathBuf),
}

/// A segment as a reader finds it: its batches, or the file they were spilled to.
enum Part {
    Memory(Vec<RecordBatch>),
    Disk(PathBuf),
}

struct Segment {
    data: Data,
    bytes: u64,
    last_use: u64,
}

struct Block {
    schema: SchemaRef,
    segments: Vec<Segment>,
}

#[derive(Default)]
struct Inner {
    blocks: HashMap<BlockId, Block>,
    in_memory: u64,
    /// Bytes of the segments on disk or being written there.
    on_disk: u64,
    clock: u64,
}

/// Counters of the store, for metrics and tests.
#[derive(Debug, Default)]
pub struct BlockStoreStats {
    /// Segments written to disk.
    pub spilled_segments: AtomicU64,
    /// Bytes written to disk.
    pub spilled_bytes: AtomicU64,
}

/// Blocks of one executor.
pub struct BlockStore {
    inner: Mutex<Inner>,
    budget: AtomicU64,
    disk_budget: AtomicU64,
    dir: PathBuf,
    seq: AtomicU64,
    /// Spill counters.
    pub stats: BlockStoreStats,
}

/// Size and row count of a stored block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockMeta {
    /// In-memory size of its batches.
    pub bytes: u64,
    /// Rows.
    pub rows: u64,
}

fn batches_size(batches: &[RecordBatch]) -> u64 {
    batches
        .iter()
        .map(|b| b.get_array_memory_size() as u64)
        .sum()
}

impl BlockStore {
    /// A store that keeps at most `budget` bytes in memory and spills to `dir`.
    pub fn new(budget: u64, dir: impl Into<PathBuf>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            budget: AtomicU64::new(budget),
            disk_budget: AtomicU64::new(u64::MAX),
            dir: dir.into(),
            seq: AtomicU64::new(0),
            stats: BlockStoreStats::default(),
        }
    }

    /// Keeps at most `budget` bytes in memory from now on (an executor learns its budget
    /// from the job spec its driver sends, after its block service started).
    pub fn set_budget(&self, budget: u64) {
        self.budget.store(budget, Ordering::SeqCst);
    }

    /// Writes at most `bytes` to disk from now on: a spill past it fails with
    /// [`Error::DiskBudget`] and keeps its data in memory.
    pub fn set_disk_budget(&self, bytes: u64) {
        self.disk_budget.store(bytes, Ordering::SeqCst);
    }

    /// Bytes held in memory now.
    pub fn in_memory(&self) -> u64 {
        self.inner.lock().unwrap().in_memory
    }

    /// Starts (or restarts) a block: drops whatever an earlier attempt left under `id`.
    pub fn create(&self, id: BlockId, schema: SchemaRef) {
        let old = {
            let mut inner = self.inner.lock().unwrap();
            let old = inner.blocks.insert(
                id,
                Block {
                    schema,
                    segments: Vec::new(),
                },
            );
            if let Some(old) = &old {
                inner.in_memory -= old.memory_bytes();
                inner.on_disk -= old.disk_bytes();
            }
            old
        };
        if let Some(old) = old {
            old.remove_files();
        }
    }

    /// Appends batches to a block created with [`BlockStore::create`], then moves the least
    /// recently used segments to disk while memory is over budget.
    pub async fn append(&self, id: BlockId, batches: Vec<RecordBatch>) -> Result<BlockMeta> {
        let meta = BlockMeta {
            bytes: batches_size(&batches),
            rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
        };
        if meta.rows == 0 {
            return Ok(meta);
        }
        {
            let mut inner = self.inner.lock().unwrap();
            inner.clock += 1;
            let last_use = inner.clock;
            let block = inner.blocks.get_mut(&id).ok_or(Error::BlockNotFound(id))?;
            block.segments.push(Segment {
                data: Data::Memory(batches),
                bytes: meta.bytes,
                last_use,
            });
            inner.in_memory += meta.bytes;
        }
        self.spill_over_budget().await?;
        Ok(meta)
    }

    /// The block's schema and batches, reading spilled segments back from disk.
    pub async fn get(&self, id: BlockId) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let (schema, batches) = self.stream(id)?;
        Ok((schema, batches.try_collect().await?))
    }

    /// The block's schema and its batches as a stream: segments in memory are shared as they
    /// are, spilled segments are read back from disk one batch at a time when the stream
    /// reaches them. Serving a spilled block thus holds a batch of it in memory, not all of it.
    pub fn stream(&self, id: BlockId) -> Result<(SchemaRef, BatchStream)> {
        let (schema, parts) = self.parts(id)?;
        let batches = futures::stream::iter(parts)
            .map(|part| match part {
                Part::Memory(batches) => futures::stream::iter(batches.into_iter().map(Ok)).boxed(),
                Part::Disk(path) => spill_stream(path),
            })
            .flatten()
            .boxed();
        Ok((schema, batches))
    }

    /// The block's schema and its segments: batches in memory, or the file of a spilled one.
    fn parts(&self, id: BlockId) -> Result<(SchemaRef, Vec<Part>)> {
        Ok({
            let mut inner = self.inner.lock().unwrap();
            inner.clock += 1;
            let now = inner.clock;
            let block = inner.blocks.get_mut(&id).ok_or(Error::BlockNotFound(id))?;
            let parts: Vec<_> = block
                .segments
                .iter_mut()
                .map(|s| {
                    s.last_use = now;
                    match &s.data {
                        Data::Memory(b) | Data::Writing(b, _) => Part::Memory(b.clone()),
                        Data::Disk(p) => Part::Disk(p.clone()),
                    }
                })
                .collect();
            (block.schema.clone(), parts)
        })
    }

    /// Whether the store holds the block.
    pub fn contains(&self, id: BlockId) -> bool {
        self.inner.lock().unwrap().blocks.contains_key(&id)
    }

    /// Drops every block of the given stages.
    pub fn drop_stages(&self, stages: &[u32]) {
        let removed: Vec<Block> = {
            let mut inner = self.inner.lock().unwrap();
            let ids: Vec<BlockId> = inner
                .blocks
                .keys()
                .filter(|id| stages.contains(&id.stage))
                .copied()
                .collect();
            let removed: Vec<Block> = ids
                .iter()
                .filter_map(|id| inner.blocks.remove(id))
                .collect();
            inner.in_memory -= removed.iter().map(Block::memory_bytes).sum::<u64>();
            inner.on_disk -= removed.iter().map(Block::disk_bytes).sum::<u64>();
            removed
        };
        for b in removed {
            b.remove_files();
        }
    }

    async fn spill_over_budget(&self) -> Result<()> {
        loop {
            let victim = {
                let mut inner = self.inner.lock().unwrap();
                if inner.in_memory <= self.budget.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let Some((id, idx)) = inner
                    .blocks
                    .iter()
                    .flat_map(|(id, b)| {
                        b.segments.iter().enumerate().filter_map(move |(i, s)| {
                            matches!(s.data, Data::Memory(_)).then_some((s.last_use, *id, i))
                        })
                    })
                    .min()
                    .map(|(_, id, i)| (id, i))
                else {
                    return Ok(());
                };
                let bytes = inner.blocks[&id].segments[idx].bytes;
                let disk_budget = self.disk_budget.load(Ordering::SeqCst);
                if inner.on_disk.saturating_add(bytes) > disk_budget {
                    return Err(Error::DiskBudget {
                        budget: disk_budget,
                        on_disk: inner.on_disk,
                        bytes,
                    });
                }
                inner.on_disk += bytes;
                let block = inner.blocks.get_mut(&id).expect("victim exists");
                let schema = block.schema.clone();
                let seg = &mut block.segments[idx];
                let path = self.dir.join(format!(
                    "block-{}-{}-{}-{}.arrow",
                    id.stage,
                    id.map,
                    id.reduce,
                    self.seq.fetch_add(1, Ordering::Relaxed)
                ));
                let Data::Memory(batches) = &seg.data else {
                    unreachable!("victims are in memory")
                };
                let batches = batches.clone();
                seg.data = Data::Writing(batches.clone(), path.clone());
                (id, schema, batches, path, seg.bytes)
            };
            let (id, schema, batches, path, bytes) = victim;
            let written = write_spill(schema, batches, path.clone()).await;
            let mut inner = self.inner.lock().unwrap();
            let seg = inner.blocks.get_mut(&id).and_then(|b| {
                b.segments
                    .iter_mut()
                    .find(|s| matches!(&s.data, Data::Writing(_, p) if *p == path))
            });
            match (written, seg) {
                (Ok(()), Some(seg)) => {
                    seg.data = Data::Disk(path);
                    inner.in_memory -= bytes;
                    self.stats.spilled_segments.fetch_add(1, Ordering::Relaxed);
                    self.stats.spilled_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                // The block was dropped or restarted while its segment was written.
                (Ok(()), None) => {
                    let _ = std::fs::remove_file(&path);
                }
                (Err(e), seg) => {
                    if let Some(seg) = seg
                        && let Data::Writing(batches, _) = &seg.data
                    {
                        let batches = batches.clone();
                        seg.data = Data::Memory(batches);
                        inner.on_disk -= bytes;
                    }
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            }
        }
    }
}

impl Block {
    fn memory_bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| matches!(s.data, Data::Memory(_) | Data::Writing(..)))
            .map(|s| s.bytes)
            .sum()
    }

    fn disk_bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| matches!(s.data, Data::Disk(_) | Data::Writing(..)))
            .map(|s| s.bytes)
            .sum()
    }

    fn remove_files(&self) {
        for s in &self.segments {
            if let Data::Disk(p) | Data::Writing(_, p) = &s.data {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

async fn write_spill(schema: SchemaRef, batches: Vec<RecordBatch>, path: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        let io = |source| Error::SpillIo {
            action: "write",
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = std::fs::File::create(&path).map_err(io)?;
        // A full disk surfaces from the writer: name the file, not just the Arrow error.
        let arrow = |e: arrow::error::ArrowError| match e {
            arrow::error::ArrowError::IoError(_, source) => io(source),
            other => io(std::io::Error::other(other)),
        };
        let mut w = FileWriter::try_new(std::io::BufWriter::new(file), &schema).map_err(arrow)?;
        for b in &batches {
            w.write(b).map_err(arrow)?;
        }
        w.finish().map_err(arrow)?;
        // Flushed (a failure here is a failure to spill), not synced: the file lives no
        // longer than the pod.
        w.into_inner()
            .map_err(arrow)?
            .into_inner()
            .map_err(|e| io(e.into_error()))?;
        Ok(())
    })
    .await
    .map_err(|e| Error::SpillIo {
        action: "write",
        path: PathBuf::new(),
        source: std::io::Error::other(e),
    })?
}

/// A block's batches, one at a time.
pub type BatchStream = BoxStream<'static, Result<RecordBatch>>;

/// Batches of a spill file read on a blocking thread, handed over one at a time: the reader
/// waits while the consumer has not taken the last batch.
fn spill_stream(path: PathBuf) -> BatchStream {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    // Detached: a dropped stream ends the read at its next batch.
    tokio::task::spawn_blocking(move || {
        let opened = std::fs::File::open(&path)
            .map_err(|source| Error::SpillIo {
                action: "read",
                path: path.clone(),
                source,
            })
            .and_then(|file| Ok(FileReader::try_new(std::io::BufReader::new(file), None)?));
        match opened {
            Err(e) => {
                // Nobody to tell when the stream was dropped meanwhile.
                let _ = tx.blocking_send(Err(e));
            }
            Ok(reader) => {
                for batch in reader {
                    // A receiver gone (the stream dropped) ends the read.
                    if tx.blocking_send(batch.map_err(Error::from)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    #[tokio::test]
    async fn spills_least_recently_used_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let one = batches_size(&[batch(10_000)]);
        let store = BlockStore::new(one * 2, dir.path());
        for map in 0..4 {
            let id = BlockId::new(1, map, 0);
            store.create(id, batch(1).schema());
            store.append(id, vec![batch(10_000)]).await.unwrap();
        }
        assert!(store.in_memory() <= one * 2);
        assert_eq!(store.stats.spilled_segments.load(Ordering::Relaxed), 2);
        for map in 0..4 {
            let (_, b) = store.get(BlockId::new(1, map, 0)).await.unwrap();
            assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 10_000);
        }
        store.drop_stages(&[1]);
        assert_eq!(store.in_memory(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(matches!(
            store.get(BlockId::new(1, 0, 0)).await,
            Err(Error::BlockNotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_failed_spill_keeps_the_data_in_memory_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A spill directory that cannot be made, as a full or read-only disk refuses it.
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let store = BlockStore::new(0, file.join("spill"));
        let id = BlockId::new(1, 0, 0);
        store.create(id, batch(1).schema());
        let err = store.append(id, vec![batch(1_000)]).await.unwrap_err();
        assert!(
            matches!(&err, Error::SpillIo { action: "write", path, .. } if path.starts_with(&file)),
            "{err}"
        );
        let (_, b) = store.get(id).await.unwrap();
        assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 1_000);
        assert_eq!(store.in_memory(), batches_size(&[batch(1_000)]));
        assert_eq!(store.stats.spilled_segments.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn spilling_stops_at_the_disk_budget_without_losing_data() {
        let dir = tempfile::tempdir().unwrap();
        let one = batches_size(&[batch(10_000)]);
        let store = BlockStore::new(0, dir.path());
        store.set_disk_budget(one * 2);
        let mut refused = None;
        for map in 0..3 {
            let id = BlockId::new(1, map, 0);
            store.create(id, batch(1).schema());
            if let Err(e) = store.append(id, vec![batch(10_000)]).await {
                refused = Some((map, e));
            }
        }
        let (map, err) = refused.expect("the third spill passes the budget");
        assert_eq!(map, 2);
        assert!(
            matches!(err, Error::DiskBudget { budget, on_disk, bytes } if budget == one * 2 && on_disk == one * 2 && bytes == one),
            "{err}"
        );
        assert!(err.to_string().contains("executors.disk"), "{err}");
        for map in 0..3 {
            let (_, b) = store.get(BlockId::new(1, map, 0)).await.unwrap();
            assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 10_000);
        }
        // Dropping blocks frees their disk for later spills.
        store.drop_stages(&[1]);
        let id = BlockId::new(2, 0, 0);
        store.create(id, batch(1).schema());
        store.append(id, vec![batch(10_000)]).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spilled_block_streams_back_a_batch_at_a_time_when_reached() {
        use futures::TryStreamExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(0, dir.path());
        let id = BlockId::new(3, 0, 0);
        store.create(id, batch(1).schema());
        store
            .append(id, vec![batch(100), batch(200)])
            .await
            .unwrap();
        store.append(id, vec![batch(300)]).await.unwrap();
        assert_eq!(store.in_memory(), 0);
        assert_eq!(store.stats.spilled_segments.load(Ordering::Relaxed), 2);

        let (schema, stream) = store.stream(id).unwrap();
        assert_eq!(schema, batch(1).schema());
        let rows: Vec<usize> = stream.map_ok(|b| b.num_rows()).try_collect().await.unwrap();
        assert_eq!(rows, [100, 200, 300]);

        // Nothing is read before the stream reaches it: files removed after the stream was
        // made fail it, naming the file.
        let (_, stream) = store.stream(id).unwrap();
        store.drop_stages(&[3]);
        let err = stream.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(
            matches!(&err, Error::SpillIo { action: "read", path, .. } if path.starts_with(dir.path())),
            "{err}"
        );
        assert!(matches!(store.stream(id), Err(Error::BlockNotFound(b)) if b == id));
    }

    #[tokio::test]
    async fn recreating_a_block_drops_the_earlier_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::new(u64::MAX, dir.path());
        let id = BlockId::new(2, 0, 3);
        store.create(id, batch(1).schema());
        store.append(id, vec![batch(5)]).await.unwrap();
        store.create(id, batch(1).schema());
        store.append(id, vec![batch(7)]).await.unwrap();
        let (_, b) = store.get(id).await.unwrap();
        assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 7);
    }

    #[test]
    fn tickets_round_trip() {
        let id = BlockId::new(4, 15, 2);
        assert_eq!(BlockId::from_ticket(id.ticket().as_bytes()), Some(id));
        assert_eq!(BlockId::from_ticket(b"4/15"), None);
        assert_eq!(BlockId::from_ticket(b"4/15/2/1"), None);
    }
}
