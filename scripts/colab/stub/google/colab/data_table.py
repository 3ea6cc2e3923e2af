"""Stand-in for `google.colab.data_table`: the interactive table formatter is a no-op here."""

from __future__ import annotations

from google.colab._log import record


def enable_dataframe_formatter() -> None:
    record("data_table.enable_dataframe_formatter")


def disable_dataframe_formatter() -> None:
    record("data_table.disable_dataframe_formatter")


class DataTable:
    """Colab's interactive table; here it shows the DataFrame as it is."""

    def __init__(self, dataframe, **kwargs) -> None:
        self.dataframe = dataframe

    def _repr_html_(self) -> str:
        return self.dataframe._repr_html_()
