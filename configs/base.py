"""Shared defaults for every experiment; experiment files override a few fields.

Every field is commented here, once. An experiment file does
`config = base.get_config()` and changes what differs, so a reader sees at a
glance how an experiment departs from the defaults. Any field can be
overridden on the command line: `--config.training.batch_size=64`.
"""

import ml_collections


def loop_fields(section: ml_collections.ConfigDict, batch_size: int) -> None:
    """The shared training loop's fields (`ddpm_jax.loop.Settings`) of a trainer's section other
    than `training` (the autoencoder, the distillation students), with their defaults."""
    section.batch_size = batch_size  # Global batch over all devices and hosts.
    section.num_steps = 50_000  # Adam updates (of this run; one round for progressive distillation).
    section.log_every = 100  # Steps between metrics.jsonl / TensorBoard / progress-bar updates.
    section.checkpoint_every = 5000  # Steps between checkpoints (resume: rerun the same command).
    section.keep_checkpoints = 3  # Most recent checkpoints kept.
    section.keep_every = 0  # Also keep every K-th step permanently (0 = none).
    section.steps_per_dispatch = 1  # Train steps fused into one compiled call.
    section.nonfinite = "error"  # On a NaN/Inf loss or gradient: error (stop, naming the step) | skip


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (the paper's CIFAR-10 values where they apply)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # Base PRNG seed: per step fold_in(seed, step); per image fold_in(seed, index).
    # The checkpoint sample / eval / bpd / figures read: -1 the newest valid one, else that step.
    config.checkpoint_step = -1

    # ---- Data -------------------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.source = "digits"  # digits | mnist | toy2d | image | folder | tfds
    data.tfds_name = ""  # tfds dataset name, e.g. "cifar10", "celeb_a_hq/256", "lsun/church_outdoor".
    data.tfds_data_dir = ""  # Local tfds data dir holding the prepared ArrayRecord files ("" = tfds default).
    data.path = ""  # image: a file path or a scikit-image picture name; folder: a directory of images.
    data.toy_name = "swiss_roll"  # toy2d: swiss_roll | s_curve | moons
    data.toy_num_points = 10_000  # toy2d: size of the training set.
    data.image_size = 32  # Height = width after resize / centre crop.
    data.num_channels = 3  # 3 = RGB, 1 = grayscale.
    data.random_flip = True  # Random horizontal flip (the paper: on, except LSUN cat).
    # Latent diffusion: an autoencoder workdir (--mode=train_autoencoder or convert --autoencoder-kl); the
    # DDPM then trains on its normalised latents (data/latents.py) and samples are decoded. "" = pixels.
    data.latents_from = ""
    data.train_split = "train"
    data.eval_split = "test"  # Split for bits/dim and reference statistics.
    data.repeat_single_image = 1024  # image: how many copies of the one picture make an "epoch".
    data.num_workers = 0  # grain worker processes (0 = in-process; fine for small data).
    data.prefetch = 2  # Batches prefetched onto the devices ahead of the step.
    # folder: an unreadable image stops the run when the data is loaded, naming the file;
    # True leaves such files out with a warning that counts them.
    data.skip_bad_images = False
    # Text conditioning (docs/text_conditioning.md): each example carries its caption's tokens (mnist:
    # captions made from the digit's label and pixels; folder: img.txt beside img.png), the U-Net gets a
    # text encoder (its vocabulary: the training captions' words) and cross-attention (model.context_dim).
    data.captions = False
    # Super-resolution (super_resolution.LowResImage): each example is also conditioned on its image box-downsampled
    # by this factor; the U-Net upsamples it and concatenates it to x_t (0 = off; 2: 8x8 digits from 4x4).
    data.low_res_factor = 0

    # ---- Model ------------------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.name = "unet"  # unet | mlp
    model.ch = 128  # Base channel count.
    model.ch_mult = (1, 2, 2, 2)  # Channel multiplier per resolution level.
    model.num_res_blocks = 2  # Residual blocks per level.
    model.attn_resolutions = (16,)  # Spatial sizes that get self-attention.
    model.dropout = 0.1  # Dropout in residual blocks (0.1 CIFAR-10, 0.0 at 256x256).
    model.resamp_with_conv = True  # Convolution in down/upsampling.
    model.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params and optimizer stay float32).
    model.attention_impl = "xla"  # jax.nn.dot_product_attention implementation: xla | cudnn
    model.remat = False  # Rematerialise residual blocks (saves memory at 256x256).
    # Class-conditional U-Net (0 = unconditional): a learned label embedding added to the timestep
    # embedding, plus a null class (index num_classes) for classifier-free guidance; docs/conditional.md.
    model.num_classes = 0
    # Text-conditional U-Net (data.captions): cross-attention SpatialTransformers of this width at
    # transformer_resolutions and in the middle block, fed by a jointly trained text encoder.
    model.context_dim = 0  # Width of the text context (0 = no cross-attention).
    model.transformer_resolutions = ()  # Spatial sizes that get a SpatialTransformer after each block.
    model.transformer_heads = 4
    model.transformer_depth = 1  # Transformer blocks per SpatialTransformer.
    model.context_length = 16  # Most caption words (tokens) the text encoder takes.
    model.text_layers = 2  # Text encoder: pre-LN transformer blocks ...
    model.text_heads = 4  # ... of this many heads.
    model.mlp_hidden = 128  # mlp: width of the gated layers.
    model.mlp_gate_init = "ones"  # mlp: initial per-timestep gates: ones | uniform (the tutorial's U[0, 1)).

    # ---- Diffusion --------------------------------------------------------------------------
    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"  # linear | quadratic | cosine | sigmoid | const | jsd | warmup10 | warmup50
    diffusion.num_timesteps = 1000  # T
    diffusion.beta_start = 1e-4  # beta_1
    diffusion.beta_end = 0.02  # beta_T
    # What the network predicts: eps | x0 | v | xprev (the posterior mean mu-tilde) | consistency (F of the
    # consistency function f = c_skip x~ + c_out F, Song et al. 2023: made by --mode=consistency only).
    diffusion.pred = "eps"
    # Reverse variance: fixedlarge (beta_t) | fixedsmall (beta-tilde_t) | learned (the network outputs
    # log sigma^2: 2C channels) | learned_range (Nichol & Dhariwal eq. 15: between beta-tilde_t and beta_t).
    diffusion.var_type = "fixedlarge"
    # Training loss: mse (L_simple, eq. 14; for xprev ||mu-tilde - mu||^2) | kl (the bound's term L_t in
    # bits/dim) | hybrid (L_simple + 0.001 L_vlb, the mean stopped in L_vlb; needs a learned variance).
    diffusion.loss = "mse"
    # Min-SNR-γ loss weighting (Hang et al. 2023) of the mse loss: each t weighted so the x_0 error counts
    # min(SNR_t, γ) times (eps / x0 / v targets); speeds up training. 0 = unweighted (the paper's L_simple).
    diffusion.min_snr_gamma = 0.0
    # Timesteps of a training batch: uniform | loss_aware (importance sampling by the last 10 losses per
    # t, reweighted to stay unbiased; Nichol & Dhariwal 3.3; its history is checkpointed).
    diffusion.t_sampler = "uniform"

    # ---- Optimisation -----------------------------------------------------------------------
    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-4  # Adam learning rate after warmup.
    optim.warmup_steps = 5000  # Linear warmup from 0.
    # After the warmup: constant (the paper's) | linear | cosine, the last two to 0 at training.num_steps.
    optim.lr_decay = "constant"
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.grad_clip = 1.0  # Global-norm gradient clipping (0 = off).
    optim.ema_decay = 0.9999  # EMA of the params; evaluation uses the EMA weights.

    # ---- Post-hoc EMA (Karras et al. 2024, §3; docs/post_hoc_ema.md) ---------------------------
    config.ema = ema = ml_collections.ConfigDict()
    ema.sigma_rels = ()  # Relative widths of the power-function EMA profiles tracked, e.g. (0.05, 0.1); () = none.
    ema.snapshot_every = 0  # Steps between snapshots of them into <workdir>/ema_snapshots (0 = none).
    ema.sigma_rel = ""  # --mode=phema: the σ_rel to reconstruct, one or a comma list (e.g. 0.05,0.1).
    ema.out_workdir = ""  # --mode=phema: where the reconstructions go ("" = <workdir>/phema); see the docs.

    # ---- Training loop ----------------------------------------------------------------------
    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # Global batch over all devices and hosts.
    training.num_steps = 800_000
    # Steps between metrics.jsonl / TensorBoard / progress-bar updates (at dispatch boundaries:
    # with steps_per_dispatch > log_every, once per dispatch).
    training.log_every = 100
    training.sample_every = 10_000  # Steps between EMA sample grids (0 = never).
    training.num_grid_samples = 64  # Images in each sample grid.
    training.checkpoint_every = 5000  # Steps between checkpoints.
    training.keep_checkpoints = 3  # Most recent checkpoints kept.
    training.keep_every = 100_000  # Also keep every K-th step permanently (0 = none).
    training.steps_per_dispatch = 1  # Train steps fused into one compiled call.
    # How those steps are fused: auto (lax.scan on accelerators, unrolled on the CPU, where XLA runs
    # convolution gradients inside a loop ~25x slower) | scan | unroll. Either resumes bitwise.
    training.dispatch_loop = "auto"
    training.nonfinite = "error"  # On a NaN/Inf loss or gradient: error (stop, naming the step) | skip
    training.eval_bpd_after = False  # Report test bits/dim when training ends.
    # Conditional models: probability of replacing a label by the null class, or a caption by the null
    # caption "" (Ho & Salimans 2022: 0.1-0.2; 0 = purely conditional, no guidance possible). Never
    # applied outside training.
    training.label_dropout = 0.1
    # Noise-conditioning augmentation of the low-res image (data.low_res_factor > 0; cascaded diffusion
    # §4.3): each example's low-res input is noised to a level s ~ U{0..this} of the run's schedule (0 = off).
    training.low_res_max_level = 0

    # ---- Sampling (--mode=sample, sample grids) ---------------------------------------------
    config.sampling = sampling = ml_collections.ConfigDict()
    # ddpm (Algorithm 2) | ddim | dpmpp_2m | dpmpp_3m | sde_dpmpp_2m | heun | euler_ancestral | consistency
    # (Song et al. 2023, Alg. 1: x0-hat, renoised to the next timestep; steps 1 = one-step generation)
    # (the registry: ddpm_jax/sampling/registry.py; docs/samplers.md).
    sampling.method = "ddpm"
    sampling.num_samples = 64
    sampling.batch_size = 256  # Global batch per compiled sampling call.
    # Timesteps N the method evaluates; 0 = its default: every step (ddpm, which takes no other), 50
    # (ddim), 20 (the solvers). Network calls: N (Heun: 2N - 1).
    sampling.steps = 0
    # How the N timesteps are laid out; "" = the method's default. ddim: leading (default) | trailing |
    # quadratic; the solvers and euler_ancestral: time_uniform | logsnr (dpmpp default) | karras (heun and
    # euler_ancestral default).
    sampling.spacing = ""
    # Stochasticity eta of ddim (eq. 16's sigma scale; 0 = deterministic) and euler_ancestral (its noise
    # sigma_up; 1 = ancestral, 0 = Euler's ODE method); unset = the method's default (ddim 0, euler_ancestral 1).
    sampling.eta = ml_collections.config_dict.placeholder(float)
    sampling.clip_denoised = True  # Clip the predicted x0 to [-1, 1] (pixels only: latents are never clipped).
    sampling.seed = 0  # Image i depends only on (seed, i).
    sampling.trajectory_every = 0  # Keep x_t and predicted x0 every n steps, write a GIF (0 = off).
    sampling.init_image = ""  # Partial denoising: the image to noise and denoise ...
    sampling.start_step = 0  # ... from this step k (0 = start from pure noise).
    # Conditional models: image i's class. '' = the null class (unconditional samples), 'all' = every
    # class in turn (i % num_classes), '3,5' = this list cycled over i.
    sampling.labels = ""
    # Classifier-free guidance w: (1 + w) eps(x, c) - w eps(x, null); 0 = the plain conditional model.
    # (diffusers' / GLIDE's scale s = 1 + w.)
    sampling.guidance_scale = 0.0
    # Text-conditional models (data.captions): image i's caption. '' = the null caption (unconditional
    # samples), 'a thin seven|a thick one' = these captions cycled over i, 'eval_split' = the captions of
    # data.eval_split's examples in order (image i gets example i's caption; for scoring against real data).
    sampling.captions = ""
    # Super-resolution models (data.low_res_factor > 0): the fixed augmentation level s of the low-res
    # inputs at sampling (0 = the images as given; at most training.low_res_max_level).
    sampling.low_res_level = 0
    # ... of this split's first images, box-downsampled, or of a folder / .npz of images already at the low
    # resolution (e.g. a base model's samples_*.npz: the cascade); '' = the null image.
    sampling.cond_images = ""

    # ---- Evaluation (--mode=eval, --mode=fid_stats) -----------------------------------------
    config.eval = evaluation = ml_collections.ConfigDict()
    # What --mode=eval measures: inception (the paper's FID / IS; needs the weights below) |
    # classifier (Fréchet distance, precision / recall, classifier score in the features of a small
    # classifier trained here, each beside its real-vs-real noise floor: digits and MNIST on a CPU).
    evaluation.metric = "inception"
    evaluation.num_samples = 50_000  # Samples for FID / IS.
    evaluation.batch_size = 500  # Global batch per generation call.
    evaluation.chunk_size = 1000  # Samples per file written under workdir/eval; resume skips done chunks.
    evaluation.inception_weights = ""  # Converted pytorch-fid Inception weights (.npz, local path).
    evaluation.fid_stats = ""  # Reference statistics (.npz with mu, sigma), local path.
    evaluation.bpd_num_examples = 0  # Test examples for bits/dim (0 = the whole split).
    evaluation.bpd_batch_size = 256
    evaluation.bpd_clip_denoised = True  # Clip predicted x0 in the bound (official calc_bpd_loop; pixels only).
    # --mode=bpd computes: vlb (the bound, eq. (5)) | ode (exact likelihood of the probability-flow ODE,
    # Song et al. 2021b: evaluation/ode_likelihood.py) | both. Different quantities: docs/samplers.md.
    evaluation.bpd_method = "vlb"
    evaluation.ode_steps = 100  # RK4 steps of the ODE, uniform in log sigma (4 network jvps each).
    evaluation.ode_trace = "hutchinson"  # Divergence: hutchinson (Rademacher probe) | exact (one jvp per dim).
    evaluation.inception_batch_size = 200  # Images per Inception call (global; resized to 299x299).
    evaluation.fid_stats_split = ""  # fid_stats split ("" = data.train_split, as the paper).
    evaluation.fid_stats_out = ""  # fid_stats .npz ("" = workdir/fid_stats_<dataset>_<split>.npz).
    # Feature classifier of the classifier metrics (ddpm_jax/evaluation/classifier.py), trained once
    # with `python -m ddpm_jax.evaluation.classifier --config=...` ("" = workdirs/classifiers/<source>_<size>).
    evaluation.classifier_path = ""

    # ---- Figures (--mode=figures): the paper's Figs. 5-8 ------------------------------------
    config.figures = figures = ml_collections.ConfigDict()
    # rate_distortion (Fig. 5) | progressive (Fig. 6) | shared_latents (Fig. 7) | interpolation (Fig. 8)
    figures.kind = "rate_distortion"
    figures.num_images = 8  # Samples per row (Figs. 6, 7).
    figures.num_columns = 10  # Fig. 6: x0-hat at this many points of the chain.
    figures.num_examples = 0  # Fig. 5: test images in the bits/dim loop (0 = eval.bpd_num_examples).

    # ---- Autoencoder (--mode=train_autoencoder): latent diffusion's first stage -------------
    # The KL autoencoder that data.latents_from reads (ddpm_jax/modes/autoencoder.py; Rombach et al.
    # 2022, Sec. 3.1): its own training loop settings, data from config.data.
    config.autoencoder = autoencoder = ml_collections.ConfigDict()
    autoencoder.block_out_channels = (128, 256, 512)  # One width per level; f = 2**(levels - 1) (LDM's KL-f4).
    autoencoder.layers_per_block = 2  # ResNet blocks per encoder level (the decoder has one more).
    autoencoder.latent_channels = 3  # c: latents are [H/f, W/f, c].
    autoencoder.norm_num_groups = 32  # GroupNorm groups (every width must be a multiple of it).
    autoencoder.mid_block_add_attention = True  # Self-attention in the encoder's and decoder's middle block.
    autoencoder.loss = "l1"  # Reconstruction loss summed per image: l1 (LDM) | l2.
    autoencoder.kl_weight = 1e-6  # Weight of KL(q(z|x) || N(0, I)) (LDM's KL-f4/f8: 1e-6).
    autoencoder.lr = 1e-4  # Adam learning rate after warmup.
    autoencoder.warmup_steps = 0  # Linear warmup from 0.
    autoencoder.beta1 = 0.9  # Adam's beta1 ...
    autoencoder.beta2 = 0.999  # ... and beta2.
    autoencoder.grad_clip = 0.0  # Global-norm clipping (0 = off, as LDM; the loss is a per-image sum).
    autoencoder.ema_decay = 0.0  # EMA of the params (0 = none, as LDM's first stage); the EMA is what is used.
    loop_fields(autoencoder, batch_size=64)
    autoencoder.eval_batch_size = 250  # Batch of the scale-factor pass (training split) and the test evaluation.
    autoencoder.eval_classifier = True  # Classifier fd of the reconstructions beside its floor (labelled data).

    # ---- Cascade (--mode=cascade, run on a super-resolution workdir) -------------------------
    config.cascade = cascade = ml_collections.ConfigDict()
    # The base model whose samples the SR model super-resolves: its config file (path[:arg]) and workdir.
    # It samples with this run's sampling.method / steps / spacing / eta / num_samples / batch_size / seed.
    cascade.base_config = ""
    cascade.base_workdir = ""
    cascade.base_overrides = ""  # Overrides of the base config, space-separated: 'checkpoint_step=400 a.b=c'.

    # ---- Progressive distillation (--mode=distill): one round per workdir -------------------
    # Salimans & Ho 2022, Algorithm 2 (ddpm_jax/modes/distill.py, docs/distillation.md): a student of N DDIM
    # steps learns the teacher's 2N. The student's diffusion.pred (v or x0) and its loss weighting are its own;
    # model, data shape and schedule must be the teacher's. Sample it with sampling.method=ddim, steps=N,
    # spacing=trailing.
    config.distill = distill = ml_collections.ConfigDict()
    distill.teacher_workdir = ""  # The teacher: a trained (or converted) model's workdir, or the previous round's.
    # The DDIM steps the teacher samples with (trailing spacing); 0 = its own: T for a trained model, N for a
    # student. Set it for the first round from a trained model when T is not a power of two (T = 100: 64 or 32).
    distill.teacher_steps = 0
    distill.steps = 0  # N, the student's steps: half the teacher's (required).
    # Loss weight of ||x~ - x^||^2: truncated_snr (max(SNR, 1), the paper's) | snr_plus_one (SNR + 1: the v-MSE).
    distill.weighting = "truncated_snr"
    distill.lr = 1e-4  # Adam learning rate (beta1, beta2, eps, grad_clip from optim) ...
    distill.lr_decay = True  # ... annealed linearly to 0 over the round (the paper's); False = constant.
    distill.ema_decay = 0.0  # EMA of the student's params, what sample / eval / the next round read (0 = none).
    loop_fields(distill, batch_size=128)

    # ---- Consistency distillation (--mode=consistency) ---------------------------------------
    # Song et al. 2023, Algorithm 2 (ddpm_jax/modes/consistency.py, docs/distillation.md): the teacher's network
    # becomes a consistency model (diffusion.pred=consistency); sample it with sampling.method=consistency.
    config.consistency = consistency = ml_collections.ConfigDict()
    consistency.teacher_workdir = ""  # The teacher: a trained (or converted) model's workdir.
    consistency.steps = 18  # N: the grid's trailing timesteps besides t = 0 (the paper: 18 on CIFAR-10).
    consistency.ema_decay = 0.95  # mu of the target network theta- (= the EMA params sample / eval read).
    # Distance d: pseudo_huber (sqrt(|a-b|^2 + c^2) - c, c = 0.00054 sqrt(dim); LPIPS needs downloaded VGG
    # weights) | l2 (the mean square).
    consistency.distance = "pseudo_huber"
    consistency.lr = 4e-4  # Adam learning rate, constant (beta1, beta2, eps, grad_clip from optim).
    loop_fields(consistency, batch_size=128)

    # ---- Multi-host ---------------------------------------------------------------------------
    config.distributed = distributed = ml_collections.ConfigDict()
    # "" = one process; "auto" = jax.distributed.initialize() detects the cluster (TPU pod,
    # SLURM, ...); "host:port" = explicit coordinator, with num_processes and process_id below.
    distributed.coordinator_address = ""
    distributed.num_processes = 1
    distributed.process_id = 0
    return config
