@echo off
rem MuseTalk with GFPGAN through the gfpgan-service: the integration plan's
rem run_inference_optimized.bat, done with the launcher (MuseTalk's scripts stay unchanged).
rem
rem   1. In MuseTalk's environment (conda activate MuseTalk), install the client and adapter once:
rem        pip install C:\path\to\gfpgan-service
rem   2. Start the service somewhere (docker compose up, or gfpgan-serve on a GPU box) and, if it
rem      is not on this machine, point at it:   set GFPGAN_ADDRESS=gpu-box:50051
rem   3. From MuseTalk's root folder:   C:\path\to\gfpgan-service\examples\run_inference_optimized.bat
rem
rem Arguments given to this file go on to MuseTalk (e.g. --use_float16 --batch_size 16).
rem The realtime script works the same way: -m scripts.realtime_inference with
rem --inference_config configs\inference\realtime.yaml --result_dir results\realtime --fps 25.

setlocal
if "%GFPGAN_ADDRESS%"=="" set "GFPGAN_ADDRESS=localhost:50051"

python -m musetalk_adapter run --gfpgan-address %GFPGAN_ADDRESS% -- -m scripts.inference ^
 --inference_config configs\inference\test.yaml ^
 --result_dir results\test ^
 --unet_model_path models\musetalkV15\unet.pth ^
 --unet_config models\musetalkV15\musetalk.json ^
 --version v15 ^
 --ffmpeg_path ffmpeg-master-latest-win64-gpl-shared\bin ^
 --enable_gfpgan --gfpgan_upscale 2 --gfpgan_model models\gfpgan\GFPGANv1.4.pth ^
 %*
exit /b %ERRORLEVEL%
