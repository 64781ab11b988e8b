"""torch-sttp: low-rank layers with an exposed, controllable spectrum (SVDP and STTP, Obukhov et al. 2021)."""
from .frames import (
    frame_to_params,
    frame_to_params_exact,
    householder_frame,
    init_frame_params,
    padded_householder_frames,
)
from .parametrizations import (
    STTP,
    SVDP,
    SpectralParametrization,
    parametrization_tensors,
    parametrize,
    spectral_parametrization,
    sttp,
    svdp,
)
from .ranks import RankPlan, project, select_ranks
from .calibration import Calibration, calibrate
from .data_aware import project_whitened
from .report import CompressionReport, compression, count_model_dof, report
from .spectral import (
    SpectralRegularizer,
    apply_spectral_norm,
    apply_spectral_regularization,
    check_optimizer,
    conv_operator_norm,
    param_groups,
    penalty,
    plot_layer_spectra,
    plot_spectra,
    plot_spectra_history,
    sigma_l2_penalty,
    singular_values,
    snapshot_spectra,
    spectral_stats,
)
from .export import to_dense, to_factorized
from .adapters import (
    adapter_state_dict,
    adapters_disabled,
    add_adapters,
    load_adapters,
    merge_adapters,
    parameter_counts,
    save_adapters,
    set_active_adapter,
    unload_adapters,
)
from .surgery import (
    cached,
    conversion,
    convert,
    converted_layers,
    forward_pass,
    load_converted,
    set_check_finite,
    skipped_layers,
)
from .tt import count_dof

__version__ = "0.1.0"
