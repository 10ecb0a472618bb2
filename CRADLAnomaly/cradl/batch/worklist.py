"""`worklist.html`: a static triage page (no server, no network) listing the scans most unusual first.

Each row shows the scan's percentile against normal scans, the score in words, its regions, a
three-plane thumbnail through the top region (the batch's quick-look PNG) and links to every output.
Column headers re-sort the table in the browser (a few lines of inline script); failed scans are listed
last with their error. All links are relative, so the folder can be moved or opened offline.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

from .. import __version__

_LINKS = [("report", "report (JSON)"), ("heatmap", "heatmap (NIfTI)"), ("png", "quick-look"),
          ("seg", "regions (DICOM SEG)"), ("pmap", "heatmap (DICOM parametric map)"),
          ("overlay", "heatmap overlay (DICOM series folder)")]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.4em .6em;text-align:left;vertical-align:middle}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
th[aria-sort=descending]::after{content:" \\25BC"} th[aria-sort=ascending]::after{content:" \\25B2"}
tr.highly-unusual td.pct{background:#f8c9c4;font-weight:bold} tr.unusual td.pct{background:#fde3bd}
tr.failed{color:#a00} tr.not-comparable{color:#666;font-style:italic}
img.thumb{height:96px;display:block} .note{color:#555;font-size:.9em}
"""

_SCRIPT = """
(function(){
  const table=document.getElementById('worklist'), body=table.tBodies[0];
  function value(row,i){const c=row.cells[i];const v=c.dataset.value;
    if(v===undefined||v==='')return null;const n=Number(v);return isNaN(n)?v.toLowerCase():n;}
  function sortBy(th,descending){
    const i=Array.from(th.parentNode.children).indexOf(th);
    const rows=Array.from(body.rows);
    rows.sort(function(a,b){const x=value(a,i),y=value(b,i);
      if(x===null&&y===null)return 0; if(x===null)return 1; if(y===null)return -1;
      const d=(x<y?-1:x>y?1:0); return descending?-d:d;});
    rows.forEach(function(r){body.appendChild(r);});
    table.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',descending?'descending':'ascending');
  }
  table.querySelectorAll('th[data-sortable]').forEach(function(th){
    th.addEventListener('click',function(){const now=th.getAttribute('aria-sort');
      sortBy(th,now?now!=='descending':th.dataset.first!=='asc');});
  });
})();
"""


def _rel(path, out_dir: Path) -> str:
    return quote(os.path.relpath(Path(path), out_dir).replace(os.sep, "/"))


def _num(value, fmt: str) -> str:
    return "" if value is None or value == "" else format(float(value), fmt)


def triage_order(rows: list[dict]) -> list[dict]:
    """Scored scans by percentile (then volume score), most unusual first; then the scans the model cannot
    compare with its normal ones (another contrast or scanner: their percentile is not a finding), in the
    same order; failed scans last, in input order."""
    scored = [r for r in rows if r.get("status") == "ok" and r.get("volume_percentile") is not None]
    rest = [r for r in rows if r not in scored]
    scored.sort(key=lambda r: (bool(r.get("out_of_distribution")), -float(r["volume_percentile"]),
                               -float(r["volume_score"]), r["index"]))
    return scored + sorted(rest, key=lambda r: r["index"])


def write_worklist(rows: list[dict], out_dir: Path, title: str = "CRADL triage worklist") -> Path:
    from ..atomic import atomic_path, writing

    out_dir = Path(out_dir)
    body = []
    for rank, row in enumerate(triage_order(rows), 1):
        ok = row.get("status") == "ok"
        pct = row.get("volume_percentile") if ok else None
        words = html.escape(str(row.get("interpretation") or "")) if ok else \
            f"failed: {html.escape(str(row.get('error') or ''))}"
        css = ("failed" if not ok else "not-comparable" if row.get("out_of_distribution") else
               "highly-unusual" if pct >= 99 else "unusual" if pct >= 95 else "")
        png = row.get("png")
        thumb = (f'<a href="{_rel(png, out_dir)}"><img class="thumb" src="{_rel(png, out_dir)}" '
                 f'alt="three planes through the top region of {html.escape(row["name"])}"></a>'
                 if ok and png and (out_dir / os.path.relpath(png, out_dir)).is_file() else "")
        centre = row.get("top_region_centre_ras")
        top = (f"({', '.join(f'{float(v):.0f}' for v in centre)}) mm RAS, "
               f"{float(row['top_region_volume_mm3']) / 1000:.1f} cm&sup3;, peak {float(row['top_region_peak']):.2f}"
               if ok and centre else ("none" if ok and row.get("n_regions") == 0 else ""))
        links = " &middot; ".join(f'<a href="{_rel(row[k], out_dir)}">{label}</a>' for k, label in _LINKS
                                  if ok and row.get(k) and (out_dir / os.path.relpath(row[k], out_dir)).exists())
        n_regions = row.get("n_regions")
        body.append(
            f'<tr class="{css}" data-status="{html.escape(row.get("status", ""))}">'
            f'<td data-value="{rank}">{rank}</td>'
            f'<td data-value="{html.escape(row["name"])}" class="name" title="{html.escape(row["input"])}">'
            f'{html.escape(row["name"])}</td>'
            f'<td class="pct" data-value="{_num(pct, ".2f")}">{_num(pct, ".1f")}</td>'
            f'<td class="words">{words}</td>'
            f'<td data-value="{_num(row.get("volume_score") if ok else None, ".4f")}">'
            f'{_num(row.get("volume_score") if ok else None, ".2f")}</td>'
            f'<td data-value="{"" if n_regions is None else n_regions}">{"" if n_regions is None else n_regions}</td>'
            f'<td>{top}</td><td>{thumb}</td><td class="links">{links}</td></tr>')
    n_ok = sum(r.get("status") == "ok" for r in rows)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">{n_ok} of {len(rows)} scans scored; most unusual first (percentile of the scan's anomaly score
among the model's normal reference scans), then the scans the model cannot compare with its normal ones
(in grey: their percentile is not a finding), failed scans last. Click a column header to re-sort. Research use only:
not for diagnostic use. Written by cradl {html.escape(__version__)}.</p>
<table id="worklist"><thead><tr>
<th data-sortable data-first="asc">#</th><th data-sortable data-first="asc">scan</th>
<th data-sortable aria-sort="descending">percentile</th>
<th>score in words</th><th data-sortable>volume score</th><th data-sortable>regions</th><th>top region</th>
<th>axial, coronal, sagittal</th><th>outputs</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""
    final = out_dir / "worklist.html"
    with atomic_path(final) as tmp, writing(final):
        tmp.write_text(page, encoding="utf-8")
    return final
