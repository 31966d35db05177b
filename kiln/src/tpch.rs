//! `kiln tpch`: writes the eight TPC-H tables as Parquet files, one file per table, generated
//! with the `tpchgen` crates.
//!
//! Each table is generated on its own thread and handed, batch by batch, to a Parquet writer on
//! another, so generation and encoding overlap; tables run side by side, largest first. Every
//! file is written under a temporary name and renamed into place when complete, so a crash never
//! leaves a half-written table behind. Row groups hold at most [`ROW_GROUP_ROWS`] rows, so that a
//! scan of the larger tables splits across many tasks.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};

/// Largest number of rows in one Parquet row group of a generated table.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// Rows per generated batch.
const BATCH_ROWS: usize = 16 * 1024;

/// Batches a table's generator may run ahead of its writer.
const CHANNEL_BATCHES: usize = 4;

/// The eight TPC-H tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    LineItem,
    Orders,
    PartSupp,
    Part,
    Customer,
    Supplier,
    Nation,
    Region,
}

/// A generator's batches (`tpchgen-arrow` is built against Kiln's `arrow`).
type SourceBatches = Box<dyn Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>>>;

impl Table {
    /// All tables, largest first, so the longest job starts first.
    const ALL: [Table; 8] = [
        Table::LineItem,
        Table::Orders,
        Table::PartSupp,
        Table::Part,
        Table::Customer,
        Table::Supplier,
        Table::Nation,
        Table::Region,
    ];

    fn name(self) -> &'static str {
        match self {
            Table::LineItem => "lineitem",
            Table::Orders => "orders",
            Table::PartSupp => "partsupp",
            Table::Part => "part",
            Table::Customer => "customer",
            Table::Supplier => "supplier",
            Table::Nation => "nation",
            Table::Region => "region",
        }
    }

    /// Rows the table will have at `scale` (lineitem: the expected count, about 4 per order).
    fn estimated_rows(self, scale: f64) -> u64 {
        let rows = match self {
            Table::LineItem => OrderGenerator::calculate_row_count(scale, 1, 1) * 4,
            Table::Orders => OrderGenerator::calculate_row_count(scale, 1, 1),
            Table::PartSupp => PartSuppGenerator::calculate_row_count(scale, 1, 1),
            Table::Part => PartGenerator::calculate_row_count(scale, 1, 1),
            Table::Customer => CustomerGenerator::calculate_row_count(scale, 1, 1),
            Table::Supplier => SupplierGenerator::calculate_row_count(scale, 1, 1),
            Table::Nation => 25,
            Table::Region => 5,
        };
        rows.max(0) as u64
    }

    fn schema(self) -> SchemaRef {
        use tpchgen_arrow::*;
        match self {
            Table::LineItem => LineItemArrow::schema_ref(),
            Table::Orders => OrderArrow::schema_ref(),
            Table::PartSupp => PartSuppArrow::schema_ref(),
            Table::Part => PartArrow::schema_ref(),
            Table::Customer => CustomerArrow::schema_ref(),
            Table::Supplier => SupplierArrow::schema_ref(),
            Table::Nation => NationArrow::schema_ref(),
            Table::Region => RegionArrow::schema_ref(),
        }
    }

    fn batches(self, scale: f64) -> SourceBatches {
        use tpchgen_arrow::*;
        match self {
            Table::LineItem => Box::new(
                LineItemArrow::new(LineItemGenerator::new(scale, 1, 1)).with_batch_size(BATCH_ROWS),
            ),
            Table::Orders => Box::new(
                OrderArrow::new(OrderGenerator::new(scale, 1, 1)).with_batch_size(BATCH_ROWS),
            ),
            Table::PartSupp => Box::new(
                PartSuppArrow::new(PartSuppGenerator::new(scale, 1, 1)).with_batch_size(BATCH_ROWS),
            ),
            Table::Part => Box::new(
                PartArrow::new(PartGenerator::new(scale, 1, 1)).with_batch_size(BATCH_ROWS),
            ),
            Table::Customer => Box::new(
                CustomerArrow::new(CustomerGenerator::new(scale, 1, 1)).with_batch_size(BATCH_ROWS),
            ),
            Table::Supplier => Box::new(
                SupplierArrow::new(SupplierGenerator::new(scale, 1, 1)).with_batch_size(BATCH_ROWS),
            ),
            Table::Nation => Box::new(
                NationArrow::new(NationGenerator::new(scale, 1, 1)).with_batch_size(BATCH_ROWS),
            ),
            Table::Region => Box::new(
                RegionArrow::new(RegionGenerator::new(scale, 1, 1)).with_batch_size(BATCH_ROWS),
            ),
        }
    }
}

/// Writes the eight TPC-H tables at scale factor `scale` as `out/<table>.parquet` (lineitem,
/// orders, customer, part, partsupp, supplier, nation, region), replacing existing files.
///
/// `out` is created if missing. Progress is shown on stderr when it is a terminal.
pub fn generate(scale: f64, out: &Path) -> Result<()> {
    ensure!(
        scale.is_finite() && scale > 0.0,
        "--scale must be a positive number, got {scale}"
    );
    fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;

    let started = Instant::now();
    let progress = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{bar:30.cyan/blue}] {human_pos:>11}/{human_len:11} rows {msg}",
    )?
    .progress_chars("=> ");
    let queue: Mutex<VecDeque<(Table, ProgressBar)>> = Mutex::new(
        Table::ALL
            .iter()
            .map(|&table| {
                let bar = progress.add(ProgressBar::new(table.estimated_rows(scale)));
                bar.set_style(style.clone());
                bar.set_prefix(table.name());
                bar.set_message("waiting");
                (table, bar)
            })
            .collect(),
    );
    if !progress.is_hidden() {
        for (_, bar) in queue.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
    }
    let total_rows = AtomicU64::new(0);
    let total_bytes = AtomicU64::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, Table::ALL.len());

    let errors: Vec<anyhow::Error> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                        let Some((table, bar)) = next else {
                            return Ok(());
                        };
                        bar.set_message("generating");
                        let (rows, bytes) = write_table(table, scale, out, &bar)?;
                        bar.set_length(rows);
                        bar.finish_with_message(format!("{:.1} MiB", bytes as f64 / 1048576.0));
                        total_rows.fetch_add(rows, Ordering::Relaxed);
                        total_bytes.fetch_add(bytes, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(anyhow::anyhow!("a TPC-H writer thread panicked")),
            })
            .collect()
    });
    if let Some(first) = errors.into_iter().next() {
        // Stop the remaining bars so the terminal is left clean.
        for (_, bar) in queue.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            bar.abandon_with_message("skipped");
        }
        return Err(first);
    }
    eprintln!(
        "wrote TPC-H scale {scale} to {}: 8 tables, {} rows, {:.1} MiB in {:.1}s",
        out.display(),
        total_rows.load(Ordering::Relaxed),
        total_bytes.load(Ordering::Relaxed) as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Generates one table into `out/<name>.parquet` through a temporary file; returns the rows
/// and bytes written.
fn write_table(table: Table, scale: f64, out: &Path, bar: &ProgressBar) -> Result<(u64, u64)> {
    let target = out.join(format!("{}.parquet", table.name()));
    let temp = out.join(format!(
        ".{}.parquet.{}.tmp",
        table.name(),
        std::process::id()
    ));
    let result = write_parquet(table, scale, &temp, bar).and_then(|rows| {
        fs::rename(&temp, &target).with_context(|| {
            format!(
                "cannot move {} into place as {}",
                temp.display(),
                target.display()
            )
        })?;
        let bytes = fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
        Ok((rows, bytes))
    });
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.with_context(|| format!("writing TPC-H table {}", table.name()))
}

/// Streams the table's batches from a generator thread into a Parquet file at `path`.
fn write_parquet(table: Table, scale: f64, path: &Path, bar: &ProgressBar) -> Result<u64> {
    let schema = table.schema();
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let mut writer = ArrowWriter::try_new(file, Arc::clone(&schema), Some(props))?;
    let (tx, rx) = sync_channel::<Result<RecordBatch>>(CHANNEL_BATCHES);

    let rows = std::thread::scope(|scope| -> Result<u64> {
        scope.spawn(move || {
            for batch in table.batches(scale) {
                let batch = batch.map_err(anyhow::Error::from);
                let failed = batch.is_err();
                // A closed channel means the writer failed and stopped reading: stop too.
                if tx.send(batch).is_err() || failed {
                    break;
                }
            }
        });
        let mut rows = 0u64;
        for batch in rx {
            let batch = batch?;
            writer.write(&batch)?;
            rows += batch.num_rows() as u64;
            bar.set_position(rows);
            if rows > bar.length().unwrap_or(0) {
                bar.set_length(rows);
            }
        }
        Ok(rows)
    })?;
    writer.close()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    fn row_count(path: &Path) -> i64 {
        let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        SerializedFileReader::new(file)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .metadata()
            .file_metadata()
            .num_rows()
    }

    #[test]
    fn generates_eight_tables_at_small_scale() {
        let dir = tempfile::tempdir().unwrap();
        generate(0.01, dir.path()).expect("generate TPC-H at scale 0.01");
        for table in Table::ALL {
            let path = dir.path().join(format!("{}.parquet", table.name()));
            assert!(path.is_file(), "{} was not written", path.display());
        }
        assert_eq!(
            row_count(&dir.path().join("nation.parquet")),
            25,
            "nation rows"
        );
        assert_eq!(
            row_count(&dir.path().join("region.parquet")),
            5,
            "region rows"
        );
        assert_eq!(
            row_count(&dir.path().join("orders.parquet")),
            15_000,
            "orders rows at scale 0.01 (1.5M per unit of scale)"
        );
        let lineitem = row_count(&dir.path().join("lineitem.parquet"));
        assert!(
            (15_000..=7 * 15_000).contains(&lineitem),
            "lineitem must hold 1 to 7 rows per order, got {lineitem}"
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporary files left behind: {leftovers:?}"
        );
    }

    #[test]
    fn overwrites_existing_tables() {
        let dir = tempfile::tempdir().unwrap();
        let region = dir.path().join("region.parquet");
        fs::write(&region, b"not parquet").unwrap();
        generate(0.01, dir.path()).expect("generate over an existing directory");
        assert_eq!(row_count(&region), 5, "region.parquet was not replaced");
    }

    #[test]
    fn rejects_bad_scale() {
        let dir = tempfile::tempdir().unwrap();
        for scale in [0.0, -1.0, f64::NAN] {
            let err = generate(scale, dir.path()).expect_err("a non-positive scale must fail");
            assert!(
                err.to_string().contains("--scale"),
                "unexpected error: {err}"
            );
        }
    }

    #[test]
    fn large_tables_split_into_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        generate(0.1, dir.path()).expect("generate TPC-H at scale 0.1");
        let file = File::open(dir.path().join("lineitem.parquet")).unwrap();
        let reader = SerializedFileReader::new(file).unwrap();
        let metadata = reader.metadata();
        let rows = metadata.file_metadata().num_rows() as usize;
        assert_eq!(
            metadata.num_row_groups(),
            rows.div_ceil(ROW_GROUP_ROWS),
            "lineitem ({rows} rows) must be cut into row groups of {ROW_GROUP_ROWS} rows"
        );
        for i in 0..metadata.num_row_groups() {
            let compression = metadata.row_group(i).column(0).compression();
            assert_eq!(
                compression,
                Compression::SNAPPY,
                "row group {i} compression"
            );
        }
    }
}
