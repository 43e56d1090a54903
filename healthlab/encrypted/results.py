"""Fitted models' results, in statsmodels' shape: objects, not ``DataFrame.attrs``
(tables' results are :class:`~healthlab.encrypted.tables.ResultTable`).

:class:`FittedModel` holds the coefficients and their covariance and gives the
Wald inference every model shares — ``bse``, ``tvalues``, ``pvalues``,
``conf_int(alpha)``, ``cov_params()``, ``to_frame()`` and statsmodels' coefficient
table — with normal (z) or Student-t reference distributions. :class:`OLSResults`
(``encrypted.ols``), :class:`~healthlab.encrypted.models.GLMResults` and
:class:`~healthlab.encrypted.cox.CoxResults` build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as distributions

from healthlab.encrypted.tables import ResultTable

__all__ = ["FittedModel", "OLSResults"]


@dataclass
class FittedModel:
    """Coefficients and their covariance, with the Wald inference every model's
    results share (statsmodels' names): ``params``, ``bse``, ``tvalues`` (z, or t
    on :meth:`df_resid` degrees of freedom where ``use_t``), ``pvalues``,
    ``conf_int(alpha)``, ``cov_params()``, ``to_frame()``."""

    params: pd.Series
    cov: np.ndarray

    #: Student-t inference (OLS) rather than normal (GLM, Cox)
    use_t = False

    @property
    def df_resid(self) -> float:
        return float("inf")

    def _reference(self) -> Any:
        if self.use_t:
            return distributions.t(self.df_resid)
        return distributions.norm()

    @property
    def names(self) -> list[str]:
        return [str(n) for n in self.params.index]

    @property
    def bse(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.cov)), index=self.params.index)

    @property
    def tvalues(self) -> pd.Series:
        return self.params / self.bse

    @property
    def pvalues(self) -> pd.Series:
        return pd.Series(
            2 * self._reference().sf(np.abs(self.tvalues.to_numpy())),
            index=self.params.index,
        )

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald confidence intervals (columns 0 and 1, as statsmodels)."""
        z = self._reference().ppf(1 - alpha / 2)
        return pd.DataFrame(
            {0: self.params - z * self.bse, 1: self.params + z * self.bse}
        )

    def cov_params(self) -> pd.DataFrame:
        return pd.DataFrame(
            self.cov, index=self.params.index, columns=self.params.index
        )

    def _ratios(self, alpha: float) -> pd.DataFrame:
        """exp(coefficient) and its CI, per term (an intercept left out)."""
        ci = self.conf_int(alpha)
        low, high = f"{alpha / 2:.3g}", f"{1 - alpha / 2:.3g}"
        return pd.DataFrame(
            {"ratio": np.exp(self.params), low: np.exp(ci[0]), high: np.exp(ci[1])}
        ).drop(index="Intercept", errors="ignore")

    def to_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """coef, std err, z, P>|z| and the CI, one row per term."""
        ci = self.conf_int(alpha)
        return pd.DataFrame(
            {
                "coef": self.params,
                "std err": self.bse,
                "z": self.tvalues,
                "P>|z|": self.pvalues,
                f"[{alpha / 2:.3g}": ci[0],
                f"{1 - alpha / 2:.3g}]": ci[1],
            }
        )

    def _summary(
        self,
        title: str,
        yname: str,
        left: list[tuple[str, list[str]]],
        right: list[tuple[str, list[str]]],
        alpha: float,
        missing: float = 0.0,
    ) -> Any:
        """statsmodels' summary: the two columns of facts, the coefficients, and
        the rows left out for missing values (if any)."""
        from statsmodels.iolib.summary import Summary

        out = Summary()
        out.add_table_2cols(
            None, gleft=left, gright=right, yname=yname, xname=self.names, title=title
        )
        out.tables.append(self._params_table(alpha, yname))
        if np.isfinite(missing) and missing:
            out.add_extra_txt([f"{int(missing)} rows left out (missing values)."])
        return out

    def _params_table(self, alpha: float, yname: str) -> Any:
        """statsmodels' coefficient table of this fit."""
        from statsmodels.iolib.summary import summary_params

        return summary_params(
            (
                None,
                self.params.to_numpy(),
                self.bse.to_numpy(),
                self.tvalues.to_numpy(),
                self.pvalues.to_numpy(),
                self.conf_int(alpha).to_numpy(),
            ),
            yname=yname,
            xname=self.names,
            alpha=alpha,
            use_t=self.use_t,
        )


@dataclass
class OLSResults(FittedModel):
    """A pooled least-squares fit, in statsmodels' shape (``RegressionResults``).

    ``params``, ``bse``, ``tvalues`` and ``pvalues`` (Student t on ``df_resid``),
    ``conf_int(alpha)``, ``cov_params()``, ``nobs``, ``df_model``, ``df_resid``,
    ``ssr``, ``rsquared``, ``rsquared_adj``, ``fvalue``, ``f_pvalue``, ``scale``,
    ``llf``, ``aic``, ``bic``, ``summary()``; ``to_frame()`` — the table (``coef``,
    ``se``, ``t``, ``P>|t|``, the 95 % CI) the receipt covers, a plain frame;
    ``table`` — the same as a :class:`~healthlab.encrypted.tables.ResultTable`
    (with ``.receipt``, ``.missing``, ``.noise``); ``receipt``.
    """

    response: str
    nobs: int
    ssr: float
    centered_tss: float
    table: ResultTable
    receipt: dict[str, Any]

    use_t = True

    @property
    def df_model(self) -> int:
        return len(self.params) - 1

    @property
    def df_resid(self) -> float:
        return float(self.nobs - len(self.params))

    @property
    def scale(self) -> float:
        return self.ssr / self.df_resid

    @property
    def rsquared(self) -> float:
        return 1.0 - self.ssr / self.centered_tss

    @property
    def rsquared_adj(self) -> float:
        return 1 - (1 - self.rsquared) * (self.nobs - 1) / self.df_resid

    @property
    def fvalue(self) -> float:
        r2 = self.rsquared
        return (r2 / self.df_model) / ((1 - r2) / self.df_resid)

    @property
    def f_pvalue(self) -> float:
        return float(distributions.f.sf(self.fvalue, self.df_model, self.df_resid))

    @property
    def llf(self) -> float:
        n = self.nobs
        return float(-n / 2 * (np.log(2 * np.pi * self.ssr / n) + 1))

    @property
    def aic(self) -> float:
        return -2 * self.llf + 2 * len(self.params)

    @property
    def bic(self) -> float:
        return float(-2 * self.llf + len(self.params) * np.log(self.nobs))

    def to_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """The coefficient table the receipt covers, a plain frame (``table`` has
        it with its metadata)."""
        if alpha != 0.05:
            raise ValueError(
                "the receipted table has 95 % intervals; use conf_int(alpha) for "
                "another level"
            )
        return self.table.to_frame()

    def summary(self, alpha: float = 0.05) -> Any:
        """statsmodels' summary table (``print(fit.summary())``)."""
        left = [
            ("Dep. Variable:", [self.response]),
            ("Model:", ["OLS, pooled"]),
            ("No. Observations:", [str(self.nobs)]),
            ("Df Residuals:", [f"{self.df_resid:.0f}"]),
            ("Df Model:", [str(self.df_model)]),
        ]
        right = [
            ("R-squared:", [f"{self.rsquared:.3f}"]),
            ("Adj. R-squared:", [f"{self.rsquared_adj:.3f}"]),
            ("F-statistic:", [f"{self.fvalue:.4g}"]),
            ("Prob (F-statistic):", [f"{self.f_pvalue:.3g}"]),
            ("Log-Likelihood:", [f"{self.llf:.5g}"]),
        ]
        return self._summary(
            "OLS Regression Results", self.response, left, right, alpha
        )

    def __repr__(self) -> str:
        return f"OLSResults({self.response!r}, nobs={self.nobs})"
