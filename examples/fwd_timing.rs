use compress::model::layer::Site;
use compress::model::llama::Model;
use compress::model::Checkpoint;
use std::time::Instant;
fn main() {
    let ckpt = Checkpoint::open(std::path::Path::new("../shared/models/ref-llama-9m")).unwrap();
    let m = Model::load(&ckpt, 512).unwrap();
    let ids: Vec<u32> = (0..4 * 512).map(|i| (i * 7 % 8000) as u32).collect();
    for _ in 0..2 {
        let t = Instant::now();
        let mut x = m.outer.embed(&ids, 4, 512).unwrap();
        let mut nh = |_: Site, _: &candle_core::Tensor| Ok(());
        for l in &m.layers {
            x = l.forward(&x, &m.rope, &mut nh).unwrap();
        }
        let t1 = t.elapsed();
        let lg = m.outer.logits(&x).unwrap();
        let v: Vec<f32> = lg.flatten_all().unwrap().to_vec1().unwrap();
        let t2 = t.elapsed();
        let n = compress::eval::ppl::nll_sum(&v[..511 * 8192], 8192, &ids[1..512]);
        println!("layers {:?} logits {:?} nll(1 window) {:?} {}", t1, t2 - t1, t.elapsed() - t2, n);
    }
}
