"""What each noise preset models and its sources, in one line each: torch-free, so that the command line can
list them (``eval --help``) without importing the simulation. The presets themselves are
:data:`hetmoe_compile.analog.config.PRESETS` (the same names, in the same order)."""

PRESET_SUMMARIES = {
    "pcm": "PCM (aihwkit PCMLikeNoiseModel, Nandakumar et al. 2019): programming noise, drift + read noise to "
    "t_inference, global drift compensation, 8-bit DAC/ADC, output noise, 512x512 tiles, per-row scaling (default)",
    "dac-adc": "8-bit DAC/ADC quantisation and output noise only; weights exact",
    "gaussian": "additive weight noise, std = sigma x the row's abs-max (sigma 0.05)",
    "standard-hwa": "aihwkit's StandardHWATrainingPreset (Rasch et al., Nat. Commun. 2023): pcm plus read noise "
    "(w_noise 0.0175, PCM_READ), IR drop 1 and constant noise management with input ranges calibrated on "
    "--calib text (or --input-ranges)",
    "reram-wan2022": "ReRAM (Wan et al., Nature 2022; aihwkit ReRamWan2022NoiseModel): programming noise and the "
    "spread at t_inference 1, 86400 (default) or 172800 s; periphery as pcm",
    "reram-cmo": "CMO/HfOx ReRAM (IBM Research Zurich; aihwkit ReRamCMONoiseModel): one device per weight, "
    "log-time relaxation and 1/f read noise; periphery as pcm",
    "hermes-pcm": "PCM of IBM's HERMES chip (Le Gallo et al., Nat. Electron. 2023; aihwkit HermesNoiseModel), two "
    "devices per weight, drift from t0 = 300 s; periphery as pcm",
    "ideal": "no noise, no quantisation: reproduces the digital model",
}
